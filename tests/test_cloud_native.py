"""Native msgpack protocol, auth, response cache, canary split and metrics over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_support import ServerThread, make_repository, request
from support import run_onnx
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p
from tandem.shared.errors import error_from_body
from tandem.shared.tensors import packb, unpackb


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], slow=False, varlen=False)


@pytest.fixture(scope="module")
def server(repo: Path, keys: tuple[Path, Path]) -> Iterator[ServerThread]:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, cost_per_call=0.002)
    with ServerThread(config) as s:
        yield s


def _x(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def _post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return request(url, "POST", path, body, {"Content-Type": p.CONTENT_TYPE, **(headers or {})})


def test_native_infer_matches_onnxruntime_and_carries_timing(server: ServerThread, repo: Path) -> None:
    x = _x(5)
    status, headers, body = _post(server.url, p.infer_path("toy"), p.InferRequest({"input": x}, id="req-1").to_wire(),
                                  {p.HEADER_REQUEST_ID: "rid-7"})
    assert status == 200, body
    resp = p.InferResponse.from_wire(body)
    assert resp.model_name == "toy" and resp.model_version == "2" and resp.id == "req-1"
    np.testing.assert_allclose(resp.outputs["logits"], run_onnx(repo / "toy/2/cloud-fp32.onnx", x), rtol=1e-5, atol=1e-5)
    timing = p.ServerTiming.from_headers(headers)
    assert timing.batch_size == 5 and timing.compute_us is not None and timing.compute_us > 0
    assert timing.queue_us is not None and timing.queue_depth == 0 and timing.cost == 0.002
    assert headers[p.HEADER_MODEL_VERSION] == "2" and headers[p.HEADER_REQUEST_ID] == "rid-7"
    assert headers["Content-Type"] == p.CONTENT_TYPE


def test_native_version_path_and_outputs(server: ServerThread, repo: Path) -> None:
    x = _x(1, seed=4)
    status, headers, body = _post(server.url, p.infer_path("toy", "1"), p.InferRequest({"input": x}, outputs=["logits"]).to_wire())
    assert status == 200 and headers[p.HEADER_MODEL_VERSION] == "1"
    np.testing.assert_allclose(
        p.InferResponse.from_wire(body).outputs["logits"], run_onnx(repo / "toy/1/cloud-fp32.onnx", x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "path,body,status,code,words",
    [
        (p.infer_path("nope"), p.InferRequest({"input": np.zeros((1, 64), np.float32)}).to_wire(), 404, "model_not_found", "nope"),
        (p.infer_path("toy", "7"), p.InferRequest({"input": np.zeros((1, 64), np.float32)}).to_wire(), 404, "model_not_found", "'7'"),
        (p.infer_path("toy"), b"\xc1garbage", 400, "bad_tensor", "malformed msgpack"),
        (p.infer_path("toy"), packb([1, 2]), 400, "invalid_input", "map"),
        (p.infer_path("toy"), p.InferRequest({"input": np.zeros((1, 63), np.float32)}).to_wire(), 400, "invalid_input", "[-1, 64]"),
        (p.infer_path("toy"), p.InferRequest({"input": np.zeros((1, 64), np.float64)}).to_wire(), 400, "bad_tensor", "FP32"),
        (p.infer_path("toy"), p.InferRequest({"x": np.zeros((1, 64), np.float32)}).to_wire(), 400, "invalid_input", "the request has [x]"),
        (p.infer_path("toy"), p.InferRequest({"input": np.zeros((1, 64), np.float32)}, outputs=["zz"]).to_wire(), 400, "invalid_input", "zz"),
        (p.infer_path("toy"), p.InferRequest({"input": np.zeros((0, 64), np.float32)}).to_wire(), 400, "invalid_input", "batch"),
        (p.infer_path("toy"), packb({"inputs": {"input": {"datatype": "FP32", "shape": [1, 64], "data": b"\0" * 8}}}), 400, "bad_tensor", "needs 256 bytes"),
    ],
)
def test_native_errors_are_msgpack_with_status(server: ServerThread, path: str, body: bytes, status: int, code: str, words: str) -> None:
    got, headers, raw = _post(server.url, path, body)
    assert got == status
    assert headers["Content-Type"] == p.CONTENT_TYPE
    doc = unpackb(raw)
    assert doc["code"] == code and words in doc["error"]
    assert type(error_from_body(got, doc)).code == code


def test_deadline_header_zero_is_refused_before_compute(server: ServerThread) -> None:
    status, _, raw = _post(server.url, p.infer_path("toy"), p.InferRequest({"input": _x()}).to_wire(), {p.HEADER_DEADLINE_MS: "0"})
    assert status == 504 and unpackb(raw)["code"] == "deadline_exceeded"
    status, _, raw = _post(server.url, p.infer_path("toy"), p.InferRequest({"input": _x()}).to_wire(), {p.HEADER_DEADLINE_MS: "soon"})
    assert status == 400 and p.HEADER_DEADLINE_MS in unpackb(raw)["error"]


def test_metrics_are_exposed_with_contract_names(server: ServerThread) -> None:
    _post(server.url, p.infer_path("toy"), p.InferRequest({"input": _x()}).to_wire())
    status, headers, body = request(server.url, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        'tandem_inference_request_success_total{model="toy",version="2"}',
        "tandem_inference_request_failure_total{",
        'tandem_inference_count_total{model="toy",version="2"}',
        'tandem_inference_exec_count_total{model="toy",version="2"}',
        "tandem_inference_queue_duration_us_bucket{",
        "tandem_inference_compute_infer_duration_us_bucket{",
        "tandem_inference_batch_size_bucket{",
        'tandem_inference_pending_request_count{model="toy",version="2"} 0.0',
        'tandem_model_instances{model="toy",provider="CPUExecutionProvider",version="2"} 1.0',
    ):
        assert name in text, name


def test_observe_all_matches_observe_value_by_value() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tandem.cloud.metrics import observe_all

    bounds = (1.0, 2.5, 10.0)
    values = [0.0, 1.0, 1.0000001, 2.5, 2.4, 9.9, 10.0, 11.0, 1e9, -3.0, 2.5, 1.0]
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    a = Histogram("h", "h", ["m"], buckets=bounds, registry=one_by_one).labels("x")
    b = Histogram("h", "h", ["m"], buckets=bounds, registry=at_once).labels("x")
    for v in values:
        a.observe(v)
    observe_all(b, values)
    observe_all(b, [])

    def lines(r: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(r).decode().splitlines() if "_created" not in line]

    assert lines(at_once) == lines(one_by_one)
    assert 'h_bucket{le="1.0",m="x"} 4.0' in lines(at_once)  # -3, 0, 1, 1: a bound is inclusive


def test_api_keys_guard_everything_but_liveness(repo: Path, keys: tuple[Path, Path]) -> None:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, api_keys=["s3cret"], warmup_batch_sizes=[1])
    with ServerThread(config) as s:
        assert request(s.url, "GET", "/v2/health/live")[0] == 200
        status, _, body = request(s.url, "GET", "/v2/health/ready")
        assert status == 401 and b"API key" in body
        status, _, raw = _post(s.url, p.infer_path("toy"), p.InferRequest({"input": _x()}).to_wire())
        assert status == 401 and unpackb(raw)["code"] == "unauthorized"
        status, _, _ = _post(s.url, p.infer_path("toy"), p.InferRequest({"input": _x()}).to_wire(), {"Authorization": "Bearer wrong"})
        assert status == 401
        assert request(s.url, "GET", "/v1/registry/models")[0] == 401
        status, _, _ = _post(s.url, p.infer_path("toy"), p.InferRequest({"input": _x()}).to_wire(), {"Authorization": "Bearer s3cret"})
        assert status == 200
        assert request(s.url, "GET", "/v2/health/ready", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_response_cache_hit(repo: Path, keys: tuple[Path, Path]) -> None:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, response_cache_size=8, warmup_batch_sizes=[1])
    with ServerThread(config) as s:
        body = p.InferRequest({"input": _x(3, seed=9)}).to_wire()
        _, h1, b1 = _post(s.url, p.infer_path("toy"), body)
        _, h2, b2 = _post(s.url, p.infer_path("toy"), body)
        _, h3, _ = _post(s.url, p.infer_path("toy"), p.InferRequest({"input": _x(3, seed=10)}).to_wire())
        assert "X-Tandem-Cache" not in h1 and h2["X-Tandem-Cache"] == "hit" and "X-Tandem-Cache" not in h3
        np.testing.assert_array_equal(p.InferResponse.from_wire(b1).outputs["logits"], p.InferResponse.from_wire(b2).outputs["logits"])
        _, h4, _ = _post(s.url, p.infer_path("toy", "1"), body)  # other version: other key
        assert "X-Tandem-Cache" not in h4
        metrics = request(s.url, "GET", "/metrics")[2].decode()
        assert 'tandem_response_cache_hits_total{model="toy",version="2"} 1.0' in metrics


async def test_canary_split_follows_weights(repo: Path, keys: tuple[Path, Path]) -> None:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, canary={"toy": {"1": 80, "2": 20}}, warmup_batch_sizes=[1])
    s = await asyncio.to_thread(ServerThread(config).start)
    try:
        body = p.InferRequest({"input": _x(1)}).to_wire()
        seen: Counter[str] = Counter()
        async with aiohttp.ClientSession() as session:
            async def one() -> None:
                async with session.post(s.url + p.infer_path("toy"), data=body) as r:
                    assert r.status == 200
                    seen[r.headers[p.HEADER_MODEL_VERSION]] += 1

            for _ in range(10):
                await asyncio.gather(*(one() for _ in range(40)))
        # 400 draws at p=0.2: mean 80, sd 8; 50..110 is beyond 3.5 sd either way.
        assert seen["1"] + seen["2"] == 400 and 50 <= seen["2"] <= 110, seen
        async with aiohttp.ClientSession() as session:
            async with session.post(s.url + p.infer_path("toy", "2"), data=body) as r:
                assert r.headers[p.HEADER_MODEL_VERSION] == "2"  # an explicit version bypasses the split
    finally:
        await asyncio.to_thread(s.stop)


def test_instances_and_providers_reported_as_really_used(repo: Path, keys: tuple[Path, Path]) -> None:
    config = ServerConfig(
        repository=repo, trusted_keys=[keys[1]], port=0, instances=2, intra_op_threads=1,
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"], warmup_batch_sizes=[1],
    )
    with ServerThread(config) as s:
        meta = json.loads(request(s.url, "GET", "/v2/models/toy")[2])
        assert meta["parameters"] == {"providers": ["CPUExecutionProvider"], "instances": 2}  # no GPU here: none claimed
        cfg = json.loads(request(s.url, "GET", "/v2/models/toy/versions/1/config")[2])
        assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}] and cfg["parameters"]["intra_op_threads"] == 1
        text = request(s.url, "GET", "/metrics")[2].decode()
        assert 'tandem_model_instances{model="toy",provider="CPUExecutionProvider",version="1"} 2.0' in text
        assert "CUDA" not in text
        bodies = [p.InferRequest({"input": _x(1, seed=i)}).to_wire() for i in range(8)]
        for body in bodies:
            assert _post(s.url, p.infer_path("toy"), body)[0] == 200


def test_access_log_is_json_with_request_id(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="tandem.cloud.access"):
        _post(server.url, p.infer_path("toy"), p.InferRequest({"input": _x()}).to_wire(), {p.HEADER_REQUEST_ID: "trace-42"})
        request(server.url, "GET", "/v2/models/nope")
        server.state.gate.close()  # lines leave in bulk; write the queued ones now
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tandem.cloud.access"]
    ok = next(line for line in lines if line["request_id"] == "trace-42")
    assert ok["status"] == 200 and ok["model"] == "toy" and ok["version"] == "2" and ok["path"] == p.infer_path("toy")
    assert ok["ms"] > 0 and abs(ok["ts"] - time.time()) < 60
    assert any(line["status"] == 404 and line["path"] == "/v2/models/nope" and line["request_id"] for line in lines)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30), st.none() | st.text(max_size=10), st.floats(0, 1e6), st.integers(100, 599))
def test_access_log_lines_are_json_whatever_the_strings_hold(rid: str, path: str, model: str | None, ms: float, status: int) -> None:
    from tandem.cloud.gate import _AccessLog

    log, got = _AccessLog(), []
    handler = logging.Handler()
    handler.emit = lambda record: got.append(record.getMessage())  # type: ignore[method-assign]
    access = logging.getLogger("tandem.cloud.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        log._pending.append((1700000000.25, rid, "POST", path, status, ms, model, "1", None))
        log.flush()
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    (line,) = got
    assert json.loads(line) == {"ts": 1700000000.25, "request_id": rid, "method": "POST", "path": path, "status": status,
                                "ms": pytest.approx(ms, abs=5e-4), "model": model, "version": "1", "remote": None}
