"""Deferrable jobs from the edge: HybridClient.submit against a real ``tandem serve`` (job API on
the embedded queue), and deferral through a real agent: cloud down -> the job waits in the agent's
outbox -> the cloud starts -> the agent submits it exactly once and its result is retrievable."""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from cloud_support import ServerThread
from support import free_port, make_bundle
from tandem.cloud.config import load_config as load_server_config
from tandem.edge import HybridClient
from tandem.edge.agent.config import load_config as load_agent_config
from tandem.edge.agent.daemon import Agent
from tandem.edge.agent.outbox import Outbox
from tandem.shared.errors import InvalidInput, Unavailable
from tandem.shared.protocol import InferRequest


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    root = tmp_path_factory.mktemp("edge-jobs") / "repo"
    make_bundle(root / "toy" / "1", keys[0], name="toy", version="1")
    return root


def _server(repo: Path, keys: tuple[Path, Path], db: Path, port: int | None = None) -> ServerThread:
    config = load_server_config(repository=repo, trusted_keys=[keys[1]], port=port or free_port(), access_log=False,
                                jobs={"store_path": db})
    return ServerThread(config)


def _jobs_in(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    finally:
        con.close()


def _cloud_answer(repo: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / "toy" / "1" / "cloud-fp32.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


@pytest.fixture
def server(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> Iterator[ServerThread]:
    with _server(repo, keys, tmp_path / "jobs.sqlite3") as s:
        yield s


def test_submit_runs_as_a_cloud_job(repo: Path, keys: tuple[Path, Path], tmp_path: Path, server: ServerThread) -> None:
    x = _rows(5)
    with HybridClient(repo / "toy" / "1", server.url, trusted_keys=[keys[1]]) as client:
        handle = client.submit(x, priority=3)
        assert not handle.deferred and handle.cloud_id is not None
        out = handle.result(timeout_s=120)
        np.testing.assert_allclose(out["logits"], _cloud_answer(repo, x), rtol=1e-5, atol=1e-6)
        st = handle.status()
        assert st.status == "succeeded" and st.id == handle.cloud_id and st.priority == 3 and st.model == "toy"
        # The same job id and inputs find the same job: no second one.
        again = client.submit(x, job_id=handle.id, priority=3)
        assert again.cloud_id == handle.cloud_id
    assert _jobs_in(tmp_path / "jobs.sqlite3") == 1


async def test_asubmit_and_a_failed_lookup(repo: Path, keys: tuple[Path, Path], tmp_path: Path, server: ServerThread) -> None:
    x = _rows(3, seed=1)
    client = HybridClient(repo / "toy" / "1", server.url, trusted_keys=[keys[1]])
    try:
        handle = await client.asubmit({"input": x}, version="1")
        out = await handle.aresult(timeout_s=120)
        np.testing.assert_allclose(out["logits"], _cloud_answer(repo, x), rtol=1e-5, atol=1e-6)
        assert (await handle.astatus()).status == "succeeded"
    finally:
        await client.aclose()


def test_bad_submits_are_refused_before_anything_is_sent(repo: Path, keys: tuple[Path, Path], tmp_path: Path,
                                                         server: ServerThread) -> None:
    with HybridClient(repo / "toy" / "1", server.url, trusted_keys=[keys[1]]) as client:
        with pytest.raises(InvalidInput, match="shape"):
            client.submit(np.zeros((2, 63), np.float32))
        with pytest.raises(InvalidInput, match="dtype complex64"):
            client.submit(np.zeros((2, 64), np.complex64))
        with pytest.raises(InvalidInput, match="within 0..9"):
            client.submit(_rows(1), priority=10)
        with pytest.raises(InvalidInput, match="http or https"):
            client.submit(_rows(1), callback="ftp://example.com/x")
        with pytest.raises(InvalidInput, match="version must be a plain name"):
            client.submit(_rows(1), version="../../v2/repository/models/toy/unload")
        with pytest.raises(InvalidInput, match="job_id must be a UUID"):
            client.submit(_rows(1), job_id="../../etc")
        with pytest.raises(InvalidInput, match="agent_url"):
            client.submit(_rows(1), defer=True)
        # A version the cloud does not have: its 4xx at once, deferral or not.
        with pytest.raises(Exception, match="no loaded version"):
            client.submit(_rows(1), version="7")
    assert _jobs_in(tmp_path / "jobs.sqlite3") == 0


def test_without_deferral_an_unreachable_cloud_is_an_error(repo: Path, keys: tuple[Path, Path]) -> None:
    with HybridClient(repo / "toy" / "1", f"http://127.0.0.1:{free_port()}", trusted_keys=[keys[1]]) as client:
        with pytest.raises(Unavailable, match="defer=True"):
            client.submit(_rows(1))


async def _agent(tmp_path: Path, keys: tuple[Path, Path], cloud_url: str, **kw: Any) -> Agent:
    cfg = load_agent_config(None, cloud_url=cloud_url, data_dir=tmp_path / "agent", trusted_keys=[keys[1]], port=0,
                            unix_socket=False, poll_interval_s=3600, upload_interval_s=0.2, upload_max_backoff_s=0.5,
                            telemetry_interval_s=3600, **kw)
    agent = Agent(cfg)
    await agent.start()
    return agent


async def _until(condition: Any, timeout: float = 120.0, what: str = "condition") -> Any:
    import asyncio

    end = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


async def test_a_deferred_job_waits_in_the_outbox_and_is_submitted_once_when_the_cloud_returns(
    repo: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    import asyncio

    port = free_port()
    cloud_url = f"http://127.0.0.1:{port}"  # nothing listens there yet
    db = tmp_path / "jobs.sqlite3"
    agent = await _agent(tmp_path, keys, cloud_url)
    client = HybridClient(repo / "toy" / "1", cloud_url, trusted_keys=[keys[1]], agent_url=agent.url)
    server = None
    try:
        x = _rows(4, seed=2)
        handle = await client.asubmit(x, defer=True, priority=5)
        assert handle.deferred and handle.cloud_id is None
        st = await handle.astatus()
        assert st.status == "queued" and st.id == handle.id and st.priority == 5
        pending = [r for _, r in agent.outbox.peek(100) if r["kind"] == "job"]
        assert [r["id"] for r in pending] == [handle.id]
        # A route record behind it, and the uploader trying (and failing) meanwhile.
        await _until(lambda: agent.uploader is not None and agent.uploader.last_error, what="an upload attempt")
        assert agent.outbox.depth() >= 1

        server = _server(repo, keys, db, port)
        await asyncio.to_thread(server.start)
        await _until(lambda: not [r for _, r in agent.outbox.peek(100) if r["kind"] == "job"], what="the job leaving the outbox")
        assert _jobs_in(db) == 1

        # A crash between the cloud's 202 and the outbox's delete sends the job again: same key, same job.
        await asyncio.to_thread(agent.outbox.append, [pending[0]])
        await _until(lambda: agent.outbox.depth() == 0, what="the re-sent job leaving the outbox")
        assert _jobs_in(db) == 1

        out = await handle.aresult(timeout_s=120)
        np.testing.assert_allclose(out["logits"], _cloud_answer(repo, x), rtol=1e-5, atol=1e-6)
        assert not handle.deferred and (await handle.astatus()).status == "succeeded"
        assert _jobs_in(db) == 1
    finally:
        await client.aclose()
        await agent.stop()
        if server is not None:
            await asyncio.to_thread(server.stop)


async def test_the_handle_finds_a_deferred_job_whoever_submits_first(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    """The app may look its job up before the agent's next upload: the key makes it one job."""
    import asyncio

    port = free_port()
    cloud_url = f"http://127.0.0.1:{port}"
    db = tmp_path / "jobs.sqlite3"
    cfg = load_agent_config(None, cloud_url=cloud_url, data_dir=tmp_path / "agent", trusted_keys=[keys[1]], port=0,
                            unix_socket=False, poll_interval_s=3600, upload_interval_s=3600)
    agent = Agent(cfg)
    await agent.start(run_loops=False)  # the uploader runs only when told to
    client = HybridClient(repo / "toy" / "1", cloud_url, trusted_keys=[keys[1]], agent_url=agent.url)
    server = _server(repo, keys, db, port)
    try:
        x = _rows(2, seed=3)
        handle = await client.asubmit(x, defer=True)
        assert handle.deferred
        await asyncio.to_thread(server.start)
        out = await handle.aresult(timeout_s=120)  # submitted by the handle itself, by its key
        np.testing.assert_allclose(out["logits"], _cloud_answer(repo, x), rtol=1e-5, atol=1e-6)
        assert agent.uploader is not None
        assert await agent.uploader.flush() == 1  # the agent's submit finds the same job
        assert agent.outbox.depth() == 0 and _jobs_in(db) == 1
    finally:
        await client.aclose()
        await agent.stop()
        await asyncio.to_thread(server.stop)


async def test_a_job_the_cloud_refuses_is_dropped_and_counted_not_retried_forever(
    repo: Path, keys: tuple[Path, Path], tmp_path: Path, server: ServerThread
) -> None:
    cfg = load_agent_config(None, cloud_url=server.url, data_dir=tmp_path / "agent", trusted_keys=[keys[1]], port=0,
                            unix_socket=False, poll_interval_s=3600, upload_interval_s=3600)
    agent = Agent(cfg)
    await agent.start(run_loops=False)
    try:
        body = base64.b64encode(InferRequest({"input": _rows(1)}).to_wire()).decode()
        bad = {"kind": "job", "model": "nope", "payload": {"body": body}}
        good = {"kind": "job", "model": "toy", "payload": {"body": body}}
        route = {"kind": "route", "model": "toy", "payload": {"tier": "edge"}}
        await agent.enqueue([bad, route, good])
        assert agent.uploader is not None
        assert await agent.uploader.flush() == 3
        stats = agent.outbox.stats()
        assert stats["depth"] == 0 and stats["dropped_refused"] == 1
        assert _jobs_in(tmp_path / "jobs.sqlite3") == 1
    finally:
        await agent.stop()


@pytest.mark.parametrize("record,message", [
    ({"kind": "job", "model": "toy", "payload": {"body": "%%%"}}, "not base64"),
    ({"kind": "job", "model": "toy"}, "must hold 'body'"),
    ({"kind": "job", "model": "../x", "payload": {"body": "AA=="}}, "plain name"),
    ({"kind": "job", "model": "toy", "version": "1/2", "payload": {"body": "AA=="}}, "plain name"),
    ({"kind": "job", "model": "toy", "payload": {"body": "AA==", "priority": 12}}, "within 0..9"),
    ({"kind": "job", "model": "toy", "payload": {"body": "AA==", "callback": "file:///etc/passwd"}}, "http or https"),
    ({"kind": "job", "model": "toy", "payload": {"body": "AA==", "extra": 1}}, "unknown job payload"),
])
def test_the_outbox_refuses_malformed_job_records(tmp_path: Path, record: dict[str, Any], message: str) -> None:
    box = Outbox(tmp_path / "outbox.sqlite")
    try:
        with pytest.raises(InvalidInput, match=message):
            box.append([record])
        assert box.depth() == 0
    finally:
        box.close()


def test_a_full_outbox_drops_reports_before_deferred_jobs(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", max_rows=3)
    try:
        [job_id] = box.append([{"kind": "job", "model": "toy", "payload": {"body": "AA=="}}])
        box.append([{"kind": "route", "model": "toy", "payload": {"tier": "edge"}} for _ in range(5)])
        kept = [r for _, r in box.peek(10)]
        assert len(kept) == 3 and kept[0]["id"] == job_id and box.stats()["dropped_full"] == 3
    finally:
        box.close()


async def test_deferral_needs_a_reachable_agent_and_its_token(repo: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    cloud_url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    token = "t" * 24
    cfg = load_agent_config(None, cloud_url=cloud_url, data_dir=tmp_path / "agent", trusted_keys=[keys[1]], port=0,
                            unix_socket=False, poll_interval_s=3600, upload_interval_s=3600, local_token=token)
    agent = Agent(cfg)
    await agent.start(run_loops=False)
    try:
        for agent_url, agent_token, error in [
            (f"http://127.0.0.1:{free_port()}", token, "the device agent at .* is unreachable too"),
            (agent.url, None, "local token"),
        ]:
            client = HybridClient(repo / "toy" / "1", cloud_url, trusted_keys=[keys[1]], agent_url=agent_url,
                                  agent_token=agent_token)
            try:
                with pytest.raises(Exception, match=error):
                    await client.asubmit(_rows(1), defer=True)
            finally:
                await client.aclose()
        assert agent.outbox.depth() == 0
        client = HybridClient(repo / "toy" / "1", cloud_url, trusted_keys=[keys[1]], agent_url=agent.url, agent_token=token)
        try:
            handle = await client.asubmit(_rows(1), defer=True)
            assert handle.deferred and [r["id"] for _, r in agent.outbox.peek(10)] == [handle.id]
        finally:
            await client.aclose()
    finally:
        await agent.stop()
