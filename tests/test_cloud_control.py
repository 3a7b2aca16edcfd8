"""Model control at run time: load, unload, reload under load without failures; a failed load keeps the old one."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from cloud_support import ServerThread, make_repository, slow_inputs
from support import make_bundle
from tandem.cloud.config import BatchingConfig, ServerConfig
from tandem.shared import protocol as p


async def _start(repo: Path, keys: tuple[Path, Path], **kw: Any) -> ServerThread:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1], **kw)
    return await asyncio.to_thread(ServerThread(config).start)


async def _native(session: aiohttp.ClientSession, s: ServerThread, model: str, name: str, x: np.ndarray | dict[str, np.ndarray]) -> tuple[int, str]:
    inputs = x if isinstance(x, dict) else {name: x}
    async with session.post(s.url + p.infer_path(model), data=p.InferRequest(inputs).to_wire()) as r:
        await r.read()
        return r.status, r.headers.get(p.HEADER_MODEL_VERSION, "")


async def _control(session: aiohttp.ClientSession, s: ServerThread, action: str, model: str) -> tuple[int, Any]:
    async with session.post(f"{s.url}/v2/repository/models/{model}/{action}") as r:
        body = await r.read()
        return r.status, json.loads(body) if body else None


async def _index(session: aiohttp.ClientSession, s: ServerThread) -> dict[tuple[str, str], dict[str, Any]]:
    async with session.post(f"{s.url}/v2/repository/index") as r:
        return {(row["name"], row["version"]): row for row in await r.json()}


async def test_reload_and_new_version_under_load_fail_nothing(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    s = await _start(repo, keys)
    try:
        x = np.ones((1, 64), np.float32)
        statuses: list[int] = []
        versions: list[str] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async def client() -> None:
                for _ in range(400):  # bounded; stops earlier once control is done
                    status, version = await _native(session, s, "toy", "input", x)
                    statuses.append(status)
                    versions.append(version)
                    if stop.is_set():
                        return

            clients = [asyncio.ensure_future(client()) for _ in range(8)]
            await asyncio.sleep(0.05)
            assert (await _control(session, s, "load", "toy"))[0] == 200  # reload v1 in place
            make_bundle(repo / "toy" / "2", keys[0], name="toy", version="2", seed=5)
            assert (await _control(session, s, "load", "toy"))[0] == 200  # v2 appears and becomes latest
            await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*clients)
            status, version = await _native(session, s, "toy", "input", x)
            assert (status, version) == (200, "2")
        assert statuses and all(st == 200 for st in statuses), sorted(set(statuses))
        assert "1" in versions and "2" in versions
    finally:
        await asyncio.to_thread(s.stop)


async def test_reload_and_unload_answer_queued_requests(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=(), varlen=False)
    s = await _start(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=1)})
    try:
        x = slow_inputs(15)
        async with aiohttp.ClientSession() as session:
            queued = [asyncio.ensure_future(_native(session, s, "slow", "x", x)) for _ in range(6)]
            await asyncio.sleep(0.03)
            assert (await _control(session, s, "load", "slow"))[0] == 200
            more = [asyncio.ensure_future(_native(session, s, "slow", "x", x)) for _ in range(3)]
            await asyncio.sleep(0.03)
            assert (await _control(session, s, "unload", "slow"))[0] == 200
            results = await asyncio.gather(*queued, *more)
            assert [st for st, _ in results] == [200] * 9
            status, _ = await _native(session, s, "slow", "x", x)
            assert status == 503  # unloaded: on disk but not served
            index = await _index(session, s)
            assert index[("slow", "1")]["state"] == "UNAVAILABLE"
            assert (await _control(session, s, "load", "slow"))[0] == 200
            assert (await _native(session, s, "slow", "x", x))[0] == 200
            status, body = await _control(session, s, "load", "nope")
            assert status == 404 and "nope" in body["error"]
            status, body = await _control(session, s, "unload", "nope")
            assert status == 404
    finally:
        await asyncio.to_thread(s.stop)


async def test_failed_load_keeps_the_old_version_serving(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1", "2"), slow=False, varlen=False)
    s = await _start(repo, keys)
    try:
        x = np.ones((1, 64), np.float32)
        async with aiohttp.ClientSession() as session:
            # A new version whose model file was altered after signing.
            shutil.copytree(repo / "toy" / "2", repo / "toy" / "3")
            manifest = json.loads((repo / "toy" / "3" / "manifest.json").read_text())
            (repo / "toy" / "3" / "cloud-fp32.onnx").write_bytes(b"not the signed model")
            status, body = await _control(session, s, "load", "toy")
            assert status == 422 and "toy" in body["error"] and body["code"] in ("hash_mismatch", "bad_bundle")
            assert (await _native(session, s, "toy", "input", x)) == (200, "2")
            index = await _index(session, s)
            assert index[("toy", "3")]["state"] == "UNAVAILABLE" and "load failed" in index[("toy", "3")]["reason"]
            assert index[("toy", "2")]["state"] == "READY"
            # The loaded version's own file breaks: the reload fails, the sessions already loaded keep serving.
            shutil.rmtree(repo / "toy" / "3")
            (repo / "toy" / "2" / "cloud-fp32.onnx").write_bytes(b"broken")
            status, body = await _control(session, s, "load", "toy")
            assert status == 422
            assert (await _native(session, s, "toy", "input", x)) == (200, "2")
            index = await _index(session, s)
            assert index[("toy", "2")]["state"] == "READY" and "load failed" in index[("toy", "2")]["reason"]
            assert manifest["name"] == "toy"
    finally:
        await asyncio.to_thread(s.stop)


async def test_bad_bundle_at_start_does_not_stop_the_others(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=True)
    (repo / "varlen" / "1" / "manifest.sig").write_bytes(b"\0" * 64)  # signature no longer verifies
    s = await _start(repo, keys)
    try:
        async with aiohttp.ClientSession() as session:
            assert (await _native(session, s, "toy", "input", np.ones((1, 64), np.float32)))[0] == 200
            assert (await _native(session, s, "varlen", "x", np.ones((1, 3), np.float32)))[0] == 503
            index = await _index(session, s)
            assert index[("varlen", "1")]["state"] == "UNAVAILABLE" and "manifest.sig" in index[("varlen", "1")]["reason"]
    finally:
        await asyncio.to_thread(s.stop)


@pytest.mark.parametrize("body", [b"{", b"[1]", b'{"parameters": {"config": "{}"}}'])
async def test_control_bad_bodies(tmp_path: Path, keys: tuple[Path, Path], body: bytes) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    s = await _start(repo, keys)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{s.url}/v2/repository/models/toy/load", data=body) as r:
                assert r.status == 400 and "error" in await r.json()
    finally:
        await asyncio.to_thread(s.stop)


async def test_close_that_times_out_still_answers_every_request(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=(), varlen=False)
    s = await _start(repo, keys, model_batching={"slow": BatchingConfig(max_batch_size=1)})
    try:
        async with aiohttp.ClientSession() as session:
            running = [asyncio.ensure_future(_native(session, s, "slow", "x", slow_inputs(150))) for _ in range(3)]
            batcher = s.state.repository.get("slow").batcher
            for _ in range(2000):
                if batcher.pending == 3:
                    break
                await asyncio.sleep(0.005)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(batcher.close(timeout=0.01), s.loop))
            results = await asyncio.wait_for(asyncio.gather(*running), 30)
        # None is left hanging: the queued ones get 503; the one computing may finish in time (200).
        statuses = sorted(st for st, _ in results)
        assert statuses in ([503, 503, 503], [200, 503, 503]), results
    finally:
        await asyncio.to_thread(s.stop)
