"""The agent's local API: native msgpack infer with the budget, errors, Unix socket, loopback only."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from agent_support import infer, publish
from support import run_onnx
from tandem.edge.agent.config import load_config
from tandem.edge.agent.daemon import Agent
from tandem.edge.agent.store import ModelStore
from tandem.shared import signing
from tandem.shared.errors import InvalidInput
from tandem.shared.protocol import CONTENT_TYPE
from tandem.shared.tensors import encode_tensors, packb, unpackb


@pytest.fixture
async def agent(tmp_path: Path, keys: tuple[Path, Path]):
    data = tmp_path / "data"
    bundle = publish(tmp_path / "repo", keys[0], "1")
    store = ModelStore(data, [signing.load_public_key(keys[1])])
    staging = store.staging_dir("toy", "1")
    shutil.copytree(bundle, staging)
    store.install(staging, "toy", "1")
    cfg = load_config(None, data_dir=data, trusted_keys=[keys[1]], models=[{"name": "toy"}], port=0,
                      policy="edge-only", max_request_bytes=1 << 20)
    a = Agent(cfg)
    await a.start()
    a.bundle_dir = bundle  # type: ignore[attr-defined]
    yield a
    await a.stop()


async def test_native_infer_runs_the_edge_model_and_reports_the_route(agent: Agent) -> None:
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    async with aiohttp.ClientSession() as s:
        status, headers, body = await infer(s, agent.url, x, latency_ms=500, policy="edge-only")
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["logits"], run_onnx(agent.bundle_dir / "edge-fp32.onnx", x), atol=1e-5)
    assert body["route"]["tier"] == "edge" and headers["X-Tandem-Tier"] == "edge"
    assert body["model_version"] == "1" and headers["X-Tandem-Model-Version"] == "1"
    assert "X-Tandem-Route-Reason" in headers
    assert agent.outbox.stats()["route_edge"] == 1


async def test_unix_socket_serves_the_same_api(agent: Agent) -> None:
    x = np.zeros((1, 64), np.float32)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(agent.config.socket_path))) as s:
        status, _, body = await infer(s, "http://agent", x)
    assert status == 200 and body["outputs"]["logits"].shape == (1, 10)


def _bad_requests() -> list[tuple[str, bytes, dict, int, str]]:
    ok = {"inputs": encode_tensors({"input": np.zeros((1, 64), np.float32)})}
    return [
        ("/v1/models/toy/infer", b"", {}, 400, "empty request body"),
        ("/v1/models/toy/infer", b"\xc1garbage", {}, 400, ""),
        ("/v1/models/toy/infer", b'{"inputs": {}}', {"Content-Type": "application/json"}, 400, "msgpack"),
        ("/v1/models/toy/infer", packb({"input": 1}), {}, 400, "unknown request field"),
        ("/v1/models/toy/infer", packb({"inputs": {"input": {"datatype": "FP32", "shape": [1, 64], "data": b"xx"}}}), {}, 400, ""),
        ("/v1/models/toy/infer", packb({"inputs": encode_tensors({"wrong": np.zeros((1, 64), np.float32)})}), {}, 400, "input"),
        ("/v1/models/toy/infer", packb({**ok, "parameters": {"latency_ms": "fast"}}), {}, 400, "latency_ms"),
        ("/v1/models/toy/infer", packb({**ok, "parameters": {"policy": "yolo"}}), {}, 400, "policy"),
        ("/v1/models/toy/infer", packb({**ok, "parameters": {"temperature": 1}}), {}, 400, "temperature"),
        ("/v1/models/toy/infer", packb(ok), {"X-Tandem-Local-Only": "maybe"}, 400, "X-Tandem-Local-Only"),
        ("/v1/models/toy/infer", packb(ok), {"X-Tandem-Deadline-Ms": "soon"}, 400, "X-Tandem-Deadline-Ms"),
        ("/v1/models/nope/infer", packb(ok), {}, 404, "not served"),
        ("/v1/models/toy/versions/9/infer", packb(ok), {}, 404, "not the active version"),
        ("/v1/models/toy/infer", b"\x00" * (2 << 20), {}, 413, "limit"),
    ]


@pytest.mark.parametrize("path, body, headers, status, match", _bad_requests(),
                         ids=["empty", "garbage", "json", "no-inputs", "short-tensor", "wrong-input", "bad-latency",
                              "bad-policy", "unknown-param", "bad-local-only-header", "bad-deadline-header",
                              "unknown-model", "inactive-version", "too-large"])
async def test_malformed_requests_get_clear_msgpack_errors(agent: Agent, path, body, headers, status, match) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(agent.url + path, data=body, headers={"Content-Type": CONTENT_TYPE, **headers}) as r:
            raw = await r.read()
            assert r.status == status, raw[:300]
    err = unpackb(raw)
    assert set(err) >= {"error", "code"} and match in err["error"]
    assert agent.outbox.stats()["route_failed"] == 0  # the app's mistake is not a routing failure


async def test_feedback_goes_to_the_outbox_and_status_shows_it(agent: Agent) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v1/feedback", json={"records": [{"kind": "feedback", "model": "toy", "label": 3}]}) as r:
            assert r.status == 200 and (await r.json())["accepted"] == 1
        async with s.post(agent.url + "/v1/feedback", json={"records": [{"kind": "bogus", "model": "toy"}]}) as r:
            assert r.status == 400 and "kind" in (await r.json())["error"]
        async with s.post(agent.url + "/v1/feedback", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await r.json())["code"] == "invalid_input"
        async with s.get(agent.url + "/v1/status") as r:
            st = await r.json()
        async with s.get(agent.url + "/v1/nothing-here") as r:
            assert r.status == 404 and (await r.json())["code"] == "not_found"
        async with s.get(agent.url + "/v2/health/ready") as r:
            assert r.status == 200
    assert st["outbox"]["depth"] == 1 and st["models"]["toy"]["active"] == "1"


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a route
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


async def test_not_reachable_on_a_non_loopback_address(agent: Agent) -> None:
    with pytest.raises(InvalidInput, match="not a loopback address"):
        load_config(None, host="0.0.0.0")
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    port = int(agent.url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection((ip, port), timeout=2).close()


def test_config_file_env_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "agent.toml").write_text('cloud_url = "http://127.0.0.1:9/"\ntrusted_keys = ["keys/tandem.pub"]\n'
                                         'data_dir = "data"\n[[models]]\nname = "digits"\nversion = "3"\n')
    monkeypatch.setenv("TANDEM_AGENT_POLL_INTERVAL_S", "7")
    cfg = load_config(tmp_path / "agent.toml")
    assert cfg.cloud_url == "http://127.0.0.1:9" and cfg.poll_interval_s == 7
    assert cfg.data_dir == tmp_path / "data" and cfg.trusted_keys == [tmp_path / "keys/tandem.pub"]
    assert cfg.models[0].version == "3"
    monkeypatch.delenv("TANDEM_AGENT_POLL_INTERVAL_S")
    (tmp_path / "bad.json").write_text(json.dumps({"poll_interval_s": -1}))
    with pytest.raises(InvalidInput, match="poll_interval_s"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


async def test_v2_json_infer_and_its_errors(agent: Agent) -> None:
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    req = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": x.ravel().tolist()}],
           "parameters": {"policy": "edge-only", "latency_ms": 200}}
    async with aiohttp.ClientSession() as s:
        async with s.post(agent.url + "/v2/models/toy/infer", json=req) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
            assert r.headers["X-Tandem-Tier"] == "edge"
        out = doc["outputs"][0]
        assert out["name"] == "logits" and out["shape"] == [2, 10] and doc["model_version"] == "1"
        want = run_onnx(agent.bundle_dir / "edge-fp32.onnx", x)
        np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 10), want, atol=1e-5)
        assert json.loads(doc["parameters"]["tandem_route"])["tier"] == "edge"
        bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": [1.0]}]}
        async with s.post(agent.url + "/v2/models/toy/infer", json=bad) as r:
            assert r.status == 400 and "error" in await r.json()
        async with s.post(agent.url + "/v2/models/toy/infer", data=b"{", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and "error" in await r.json()


async def test_an_app_that_stalls_mid_body_gets_408(agent: Agent) -> None:
    """Without a bound, the handler would wait for the rest of the body until the agent stops."""
    import asyncio
    import time

    agent.config.read_timeout_s = 0.5
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/models/toy/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + CONTENT_TYPE.encode()
                     + b"\r\nContent-Length: 1000\r\n\r\n" + b"\x81")
        await writer.drain()
        t0 = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408") and 0.4 < time.monotonic() - t0 < 5
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        body = unpackb(await reader.readexactly(length))
        assert body["code"] == "request_timeout" and "0.5 s" in body["error"]
    finally:
        writer.close()
