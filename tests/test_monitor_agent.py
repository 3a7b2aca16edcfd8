"""The agent's drift monitor: a device serving the digits bundle through the cascade with a real
cloud tier profiles what it answers, compares escalated answers with its edge's, takes labels
from feedback, writes monitor.json, uploads its report through the outbox, and `tandem monitor`
reports and plots it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from agent_support import infer, wait_for
from cloud_support import ServerThread, request
from tandem.cloud.config import ServerConfig
from tandem.edge.agent.config import load_config
from tandem.edge.agent.daemon import Agent
from tandem.edge.agent.monitor import MONITOR_FILE
from tandem.edge.agent.store import ModelStore
from tandem.shared import signing
from tandem.shared.errors import InvalidInput
from test_monitor_support import make_digits_bundle, stream


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("repo")
    make_digits_bundle(repo / "digits" / "1", keys[0])
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1], access_log=False,
                          monitoring={"interval_s": 0.1, "max_cpu_share": 1.0})
    with ServerThread(config) as s:
        yield s


@pytest.fixture
async def agent(tmp_path: Path, keys: tuple[Path, Path], cloud: ServerThread):  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    store = ModelStore(data, [signing.load_public_key(keys[1])])
    staging = store.staging_dir("digits", "1")
    shutil.copytree(cloud.config.repository / "digits" / "1", staging)
    store.install(staging, "digits", "1")
    cfg = load_config(None, data_dir=data, trusted_keys=[keys[1]], models=[{"name": "digits"}], port=0,
                      cloud_url=cloud.url, policy="cascade", unix_socket=False)
    a = Agent(cfg)
    await a.start(run_loops=False)  # the test drives the monitor's intervals and the upload itself
    yield a
    await a.stop()


async def _send(agent: Agent, x: np.ndarray, rows: int = 8) -> list[dict]:
    routes = []
    async with aiohttp.ClientSession() as s:
        for i in range(0, len(x), rows):
            status, _, body = await infer(s, agent.url, x[i : i + rows], model="digits", latency_ms=2000)
            assert status == 200, body
            routes.append(body["route"])
    return routes


async def test_agent_profiles_compares_escalations_and_uploads_its_drift(agent: Agent, cloud: ServerThread, tmp_path: Path) -> None:
    clean, _ = stream(None, 640, seed=11)
    routes = await _send(agent, clean, rows=1)  # one row per call: the cascade decides row by row
    assert {r["tier"] for r in routes} == {"edge", "cloud"}  # the cascade kept some, escalated others
    m = agent.monitor.models["digits"]
    await wait_for(lambda: not agent.monitor._comparing, 30, "escalations compared with the edge")
    await agent.monitor.tick()
    doc = json.loads((agent.config.data_dir / MONITOR_FILE).read_text())["models"]["digits"]
    assert doc["tier"] == "edge" and doc["window_rows"] == 640 and not doc["drifting"]  # every call profiled
    q = doc["live_quality"]
    assert q["escalations_compared"] == sum(1 for r in routes if r["tier"] == "cloud")
    assert 0.5 < q["escalation_agreement"] < 1.0 and 0 < q["edge_share"] < 1
    # The share the cascade kept on the edge against what calibration promised at its threshold.
    assert q["expected_edge_share"] is not None and abs(q["cascade_keep_share"] - q["expected_edge_share"]) < 0.15

    bright, _ = stream("brightness", 640, seed=12)
    routes = await _send(agent, bright)
    await wait_for(lambda: not agent.monitor._comparing, 30, "escalations compared with the edge")
    await agent.monitor.tick()
    doc = json.loads((agent.config.data_dir / MONITOR_FILE).read_text())["models"]["digits"]
    assert doc["drifting"] and doc["score"] >= doc["threshold"] and doc["features"][0]["name"].startswith("input")

    # Labels through the local API's feedback, each with the prediction it judges.
    async with aiohttp.ClientSession() as s:
        x, y = stream(None, 16, seed=13)
        _, _, body = await infer(s, agent.url, x, model="digits", latency_ms=2000)
        predicted = np.asarray(body["outputs"]["logits"]).argmax(1)
        records = [{"kind": "feedback", "model": "digits", "version": "1", "label": str(int(label)),
                    "payload": {"prediction": str(int(p)), "tier": body["route"]["tier"]}} for p, label in zip(predicted, y)]
        async with s.post(f"{agent.url}/v1/feedback", json={"records": records}) as r:
            assert r.status == 200, await r.text()
    assert m.quality()["labelled"] == 16 and m.quality()["accuracy"] == pytest.approx(float(np.mean(predicted == y)))
    # The labelled call's escalations are compared in the background: let them land first, or one
    # finishing after the upload below is news to the "nothing new" check at the end.
    await wait_for(lambda: not agent.monitor._comparing, 30, "escalations compared with the edge")

    # The drift report travels through the outbox to the cloud, which shows it beside its own.
    await agent.monitor.upload()
    assert agent.uploader is not None
    await agent.uploader.flush()

    def cloud_sees_it() -> bool:
        _, _, raw = request(cloud.url, "GET", "/v1/monitor/digits")
        reports = json.loads(raw)["edge_reports"]
        return bool(reports) and reports[-1]["drifting"] is True

    await wait_for(cloud_sees_it, 30, "the agent's report in the cloud monitor")
    # The route records went up too: the cloud holds the cascade's keep share against calibration.
    _, _, raw = request(cloud.url, "GET", "/v1/monitor/digits")
    cq = json.loads(raw)["live_quality"]
    assert cq["routed"] >= len(routes) and cq["expected_edge_share"] == q["expected_edge_share"]
    assert 0 < cq["cascade_keep_share"] < 1 and 0.5 < cq["target"] <= 1

    # Nothing new: monitor.json is not rewritten and no report is queued again.
    await agent.monitor.tick()
    path = agent.config.data_dir / MONITOR_FILE
    before, depth = path.stat().st_mtime_ns, agent.outbox.depth()
    await agent.monitor.tick()
    await agent.monitor.upload()
    assert path.stat().st_mtime_ns == before and agent.outbox.depth() == depth

    # tandem monitor on the agent's data directory: report and plot.
    out = tmp_path / "agent-monitor.png"
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tandem.shared.cli", "monitor", str(agent.config.data_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "digits:1 (edge): DRIFTING" in run.stdout and "edge agrees with cloud" in run.stdout
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("monitoring", [{"threshold": 0.1, "window": 200, "min_rows": 100}, {"enabled": False}])
async def test_the_agents_monitoring_settings_apply(tmp_path: Path, keys: tuple[Path, Path], cloud: ServerThread,
                                                   monitoring: dict) -> None:
    data = tmp_path / "data"
    store = ModelStore(data, [signing.load_public_key(keys[1])])
    staging = store.staging_dir("digits", "1")
    shutil.copytree(cloud.config.repository / "digits" / "1", staging)
    store.install(staging, "digits", "1")
    cfg = load_config(None, data_dir=data, trusted_keys=[keys[1]], models=[{"name": "digits"}], port=0,
                      policy="edge-only", unix_socket=False, monitoring=monitoring)
    a = Agent(cfg)
    await a.start(run_loops=False)
    try:
        await _send(a, stream(None, 240, seed=21)[0])
        await a.monitor.tick()
        if not monitoring.get("enabled", True):
            assert a.monitor.models == {}  # served, not profiled
            return
        doc = json.loads((data / MONITOR_FILE).read_text())["models"]["digits"]
        assert (doc["threshold"], doc["window"], doc["min_rows"]) == (0.1, 200, 100)
        assert doc["window_rows"] == 200  # the window holds the most recent 200 of 240
    finally:
        await a.stop()


def test_monitoring_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="monitoring.min_rows .* cannot exceed monitoring.window"):
        load_config(None, data_dir=tmp_path, monitoring={"window": 100, "min_rows": 200})
