"""Real agent processes against the cloud's registry and feedback endpoints on 127.0.0.1:
updates under load, refusals, SIGKILL mid-download and mid-activation, and an outage."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from agent_support import (
    AgentProcess,
    TestCloud,
    infer,
    publish,
    reseal_with_wrong_samples,
    tamper_edge_file,
    wait_for,
    write_config,
)
from tandem.shared import signing

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def cloud(tmp_path: Path):
    c = TestCloud(tmp_path / "repo", tmp_path / "feedback.sqlite")
    (tmp_path / "repo").mkdir()
    await c.start()
    yield c
    await c.close()


def state(data: Path) -> dict:
    try:
        return json.loads((data / "models/toy/state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def active(data: Path) -> str | None:
    try:
        return json.loads((data / "models/toy/active.json").read_text())["version"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


async def test_updates_reach_the_agent_and_bad_versions_are_refused_without_a_failed_call(
    tmp_path: Path, keys: tuple[Path, Path], cloud: TestCloud
) -> None:
    data = tmp_path / "data"
    publish(cloud.repository, keys[0], "1")
    agent = AgentProcess(write_config(tmp_path / "agent.json", cloud.url, keys[1], data), data)
    try:
        url = await agent.wait_serving()
        x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
        seen: list[str] = []
        failures: list[tuple[int, object]] = []
        stop = asyncio.Event()

        async def load() -> None:
            async with aiohttp.ClientSession() as s:
                deadline = time.monotonic() + 60  # bounded in time and count
                for _ in range(20_000):
                    if stop.is_set() or time.monotonic() > deadline:
                        return
                    status, _, body = await infer(s, url, x)
                    if status != 200:
                        failures.append((status, body))
                    else:
                        seen.append(body["model_version"])
                    await asyncio.sleep(0.005)

        task = asyncio.create_task(load())
        await wait_for(lambda: seen, 10, "first answers")
        publish(cloud.repository, keys[0], "2")
        await wait_for(lambda: seen and seen[-1] == "2", 20, "version 2 to serve calls")

        tamper_edge_file(publish(cloud.repository, keys[0], "3"))
        await wait_for(lambda: "3" in state(data).get("refused", {}), 20, "tampered v3 refused")
        other_priv, _ = signing.generate_keypair(tmp_path / "other-key")
        publish(cloud.repository, other_priv, "4")
        await wait_for(lambda: "4" in state(data).get("refused", {}), 20, "foreign-signed v4 refused")
        reseal_with_wrong_samples(publish(cloud.repository, keys[0], "5"), keys[0])
        await wait_for(lambda: "5" in state(data).get("refused", {}), 20, "v5 refused in probation")
        n_before = len(seen)
        await wait_for(lambda: len(seen) > n_before + 20, 10, "calls after the refusals")
        stop.set()
        await task

        async def reported() -> bool:  # the refusals also reach the cloud as telemetry
            events = await cloud.records(kind="telemetry", model="toy")
            return {e["version"] for e in events if e["payload"].get("event") == "update_refused"} >= {"3", "4", "5"}

        await wait_for(reported, 10, "the refusals to be reported to the cloud", interval=0.2)
    finally:
        agent.stop()
    refused = state(data)["refused"]
    assert refused["3"]["code"] == "hash_mismatch"
    assert refused["4"]["code"] == "untrusted_signature"
    assert refused["5"]["code"] == "probation_failed"
    assert failures == []
    assert seen[-1] == "2" and set(seen) == {"1", "2"}
    assert seen == sorted(seen)  # never went back to 1 after 2 served
    assert active(data) == "2" and sorted(p.name for p in (data / "models/toy").iterdir() if p.is_dir()) == ["1", "2"]


async def test_killed_mid_download_and_mid_activation_restarts_consistent(
    tmp_path: Path, keys: tuple[Path, Path], cloud: TestCloud
) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "agent.json", cloud.url, keys[1], data)
    publish(cloud.repository, keys[0], "1")
    a = AgentProcess(cfg, data)
    await a.wait_ready()
    await wait_for(lambda: active(data) == "1", 20, "version 1 active")
    assert a.stop() == 0

    # A big edge model so the download takes many chunks; the hook kills after the first one.
    publish(cloud.repository, keys[0], "2", edge_hidden=(2048,))
    a = AgentProcess(cfg, data, env={"TANDEM_AGENT_TEST_CRASH_AT": "download"})
    assert await a.wait_exit() == -9
    parts = list((data / "tmp/toy/2").glob("*.part"))
    full = (cloud.repository / "toy/2/edge-fp32.onnx").stat().st_size
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < full
    assert active(data) == "1"

    a = AgentProcess(cfg, data)
    url = await a.wait_ready()
    x = np.zeros((1, 64), np.float32)
    async with aiohttp.ClientSession() as s:
        status, _, body = await infer(s, url, x)  # serves at once, from a consistent version
        assert status == 200 and body["model_version"] in ("1", "2")

        async def serving_2() -> bool:
            status, _, body = await infer(s, url, x)
            assert status == 200, body  # never a failed call while the update finishes
            return body["model_version"] == "2"

        await wait_for(serving_2, 30, "the download to finish after restart and v2 to serve")
        assert active(data) == "2"
    assert cloud.resumed >= 1, "the download restarted from zero instead of resuming"
    assert not (data / "tmp/toy/2").exists()
    assert a.stop() == 0

    # Killed after v3 is moved into place but before the pointer moves.
    publish(cloud.repository, keys[0], "3")
    a = AgentProcess(cfg, data, env={"TANDEM_AGENT_TEST_CRASH_AT": "activate"})
    assert await a.wait_exit() == -9
    assert active(data) == "2" and (data / "models/toy/3").is_dir()
    a = AgentProcess(cfg, data)
    try:
        url = await a.wait_ready()
        assert active(data) == "3"  # recovery finished the activation before serving
        async with aiohttp.ClientSession() as s:
            status, _, body = await infer(s, url, x)
        assert status == 200 and body["model_version"] == "3"
        assert "interrupted activation" in state(data)["log"][-1]["message"]
    finally:
        a.stop()


async def test_outage_records_wait_in_the_outbox_and_arrive_complete_in_order(
    tmp_path: Path, keys: tuple[Path, Path], cloud: TestCloud
) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "agent.json", cloud.url, keys[1], data, upload_max_backoff_s=0.6,
                       telemetry_interval_s=0.5)
    publish(cloud.repository, keys[0], "1")
    a = AgentProcess(cfg, data)
    label = 0

    async def send(url: str, n: int) -> None:
        nonlocal label
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                recs = [{"kind": "feedback", "model": "toy", "label": label + i} for i in range(5)]
                label += 5
                async with s.post(url + "/v1/feedback", json={"records": recs}) as r:
                    assert r.status == 200
                await infer(s, url, np.zeros((1, 64), np.float32))

    try:
        url = await a.wait_serving()
        await send(url, 10)
        await cloud.stop()  # outage
        await send(url, 20)
        await asyncio.sleep(1.0)  # uploads fail meanwhile
        assert a.stop() == 0  # and the agent restarts during the outage
        a = AgentProcess(cfg, data)
        url = await a.wait_ready()
        await send(url, 20)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/status") as r:
                st = await r.json()
        assert st["outbox"]["depth"] >= 200
        await cloud.start()

        async def all_arrived() -> bool:
            return len(await cloud.records(kind="feedback", model="toy")) >= label

        await wait_for(all_arrived, 30, "every feedback record at the cloud", interval=0.3)
        await wait_for(lambda: _depth(data) == 0 or _depth(data) < 5, 10, "the outbox to drain")
    finally:
        a.stop()
    fb = await cloud.records(kind="feedback", model="toy")
    assert [r["label"] for r in fb] == list(range(label))  # complete, in order, no duplicates
    routes = await cloud.records(kind="route", model="toy")
    assert len(routes) == 50 and all(r["payload"]["tier"] == "edge" for r in routes)
    assert await cloud.records(kind="telemetry", model="toy")


def _depth(data: Path) -> int:
    from tandem.edge.agent.outbox import read_stats

    s = read_stats(data / "outbox.sqlite")
    return s["depth"] if s else 0
