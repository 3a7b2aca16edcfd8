"""The updater and the router in-process against the real cloud tier: version policy, refusals not
retried, offline, and the agent's routing decisions (same router as the Python client)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from agent_support import TestCloud, free_port, infer, publish, reseal_with_wrong_samples
from tandem.edge.agent.config import load_config
from tandem.edge.agent.daemon import Agent


@pytest.fixture
async def cloud(tmp_path: Path):
    (tmp_path / "repo").mkdir()
    c = TestCloud(tmp_path / "repo", tmp_path / "feedback.sqlite")
    await c.start()
    yield c
    await c.close()


async def make_agent(tmp_path: Path, keys, cloud_url: str | None, **kw) -> Agent:
    cfg = load_config(None, cloud_url=cloud_url, data_dir=tmp_path / "data", trusted_keys=[keys[1]], port=0,
                      unix_socket=False, poll_interval_s=3600, upload_interval_s=3600, **kw)
    a = Agent(cfg)
    await a.start(run_loops=False)
    return a


async def test_pinned_version_and_pinning_back_to_a_kept_version(tmp_path: Path, keys, cloud: TestCloud) -> None:
    for v in ("1", "2", "3"):
        publish(cloud.repository, keys[0], v)
    a = await make_agent(tmp_path, keys, cloud.url, models=[{"name": "toy", "version": "2"}], keep_versions=2)
    try:
        assert a.updater is not None
        assert await a.updater.poll_once() == {"toy": "activated"}
        assert a.store.active_version("toy") == "2" and a.routers["toy"].router.version == "2"
        assert await a.updater.poll_once() == {"toy": "up-to-date"}
        a.config.models[0].version = "latest"
        assert await a.updater.poll_once() == {"toy": "activated"}
        assert a.routers["toy"].router.version == "3"
        a.config.models[0].version = "2"  # roll back by pinning: no download, the kept copy is reused
        requests_before = cloud.range_requests
        assert await a.updater.poll_once() == {"toy": "activated"}
        assert a.routers["toy"].router.version == "2" and cloud.range_requests == requests_before
        a.config.models[0].version = "9"
        assert await a.updater.poll_once() == {"toy": "error"}
        assert "not in the registry" in a.store.state("toy")["last_attempt"]["message"]
        assert a.routers["toy"].router.version == "2"
    finally:
        await a.stop()


async def test_a_refused_version_is_not_fetched_again_until_it_changes(tmp_path: Path, keys, cloud: TestCloud) -> None:
    publish(cloud.repository, keys[0], "1")
    reseal_with_wrong_samples(publish(cloud.repository, keys[0], "2"), keys[0])
    a = await make_agent(tmp_path, keys, cloud.url, models=[{"name": "toy"}])
    try:
        assert a.updater is not None
        assert await a.updater.poll_once() == {"toy": "refused"}
        assert a.store.active_version("toy") is None
        assert await a.updater.poll_once() == {"toy": "refused-before"}
        publish(cloud.repository, keys[0], "2")  # republished, fixed: new manifest bytes
        assert await a.updater.poll_once() == {"toy": "activated"}
    finally:
        await a.stop()


async def test_offline_keeps_serving_the_last_good_version(tmp_path: Path, keys, cloud: TestCloud) -> None:
    publish(cloud.repository, keys[0], "1")
    a = await make_agent(tmp_path, keys, cloud.url, models=[{"name": "toy"}], policy="cascade")
    try:
        assert a.updater is not None
        assert await a.updater.poll_once() == {"toy": "activated"}
        await cloud.stop()
        assert await a.updater.poll_once() == {"toy": "offline"}
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                status, headers, body = await infer(s, a.url, np.zeros((1, 64), np.float32), latency_ms=300)
                assert status == 200 and body["model_version"] == "1"
    finally:
        await a.stop()


async def test_the_agent_routes_like_the_python_client(tmp_path: Path, keys) -> None:
    """Through the real cloud tier: cloud-only goes to the cloud, local_only never leaves the device."""
    from tandem.cloud.app import create_app
    from tandem.cloud.config import ServerConfig

    repo = tmp_path / "repo"
    publish(repo, keys[0], "1")
    port = free_port()
    runner = web.AppRunner(create_app(ServerConfig(repository=repo, port=port, trusted_keys=[keys[1]],
                                                   warmup_batch_sizes=[1], access_log=False, cost_per_call=0.5)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    a = await make_agent(tmp_path, keys, url, models=[{"name": "toy"}])
    try:
        assert a.updater is not None
        assert await a.updater.poll_once() == {"toy": "activated"}
        x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
        async with aiohttp.ClientSession() as s:
            status, headers, body = await infer(s, a.url, x, policy="cloud-only", latency_ms=5000)
            assert status == 200, body
            assert body["route"]["tier"] == "cloud" and headers["X-Tandem-Tier"] == "cloud"
            assert body["route"]["cost"] == pytest.approx(0.5)
            status, headers, body = await infer(s, a.url, x, policy="cloud-only", local_only=True)
            assert status == 200 and body["route"]["tier"] == "edge"
            status, headers, body = await infer(s, a.url, x, policy="constrained", max_cost=0.1, latency_ms=5000)
            assert status == 200 and body["route"]["tier"] == "edge"  # the cloud costs more than allowed
    finally:
        await a.stop()
        await runner.cleanup()


async def test_a_batch_too_large_for_the_cloud_is_split_and_an_oversized_record_dropped(tmp_path: Path, keys, cloud: TestCloud) -> None:
    import time
    import uuid

    from tandem.edge.agent.outbox import Outbox
    from tandem.edge.agent.sync import Uploader

    cloud.feedback.max_body_bytes = 8_000  # a batch of all records is over it; each small one is under
    cfg = load_config(None, cloud_url=cloud.url, data_dir=tmp_path / "data", trusted_keys=[keys[1]], upload_batch=50)
    outbox = Outbox(tmp_path / "outbox.sqlite3")

    def rec(i: int, size: int) -> dict:
        return {"id": str(uuid.uuid4()), "kind": "feedback", "model": "toy", "label": i,
                "payload": {"note": "x" * size}, "created_at": time.time()}

    records = [rec(i, 300) for i in range(30)]
    records.insert(10, rec(99, 20_000))  # alone it is still too large: refused, dropped, counted
    outbox.append(records)
    async with aiohttp.ClientSession() as session:
        sent = await Uploader(cfg, outbox, session).flush()
    assert sent == 31 and outbox.depth() == 0
    got = await cloud.records(model="toy")
    assert [r["label"] for r in got] == list(range(30))
    assert outbox.stats()["dropped_refused"] == 1
    outbox.close()
