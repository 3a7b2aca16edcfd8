"""Open Inference Protocol v2 end to end with the unmodified tritonclient.http client."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from cloud_support import ServerThread, make_repository, request
from support import run_onnx
from tandem.cloud.config import ServerConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[ServerThread]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), keys[0], slow=False)
    with ServerThread(ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def _x(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def _expected(server: ServerThread, x: np.ndarray, version: str = "2") -> np.ndarray:
    return run_onnx(server.config.repository / "toy" / version / "cloud-fp32.onnx", x)


def test_health_and_metadata(client: th.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("toy") and client.is_model_ready("toy", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "tandem" and "binary_tensor_data" in meta["extensions"]
    m = client.get_model_metadata("toy")
    assert m["versions"] == ["1", "2"] and m["platform"] == "onnxruntime_onnx"
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert m["parameters"]["providers"] == ["CPUExecutionProvider"]  # what onnxruntime really uses
    cfg = client.get_model_config("toy")
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["dims"] == [64]
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"


def test_infer_binary_by_default(server: ServerThread, client: th.InferenceServerClient) -> None:
    x = _x()
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("toy", [inp], request_id="abc")
    np.testing.assert_allclose(result.as_numpy("logits"), _expected(server, x), rtol=1e-5, atol=1e-5)
    resp = result.get_response()
    assert resp["model_version"] == "2" and resp["id"] == "abc"
    assert "binary_data_size" in resp["outputs"][0]["parameters"]


def test_infer_json_tensors_and_version(server: ServerThread, client: th.InferenceServerClient) -> None:
    x = _x(2, seed=1)
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = th.InferRequestedOutput("logits", binary_data=False)
    result = client.infer("toy", [inp], model_version="1", outputs=[out])
    assert "data" in result.get_response()["outputs"][0]
    np.testing.assert_allclose(result.as_numpy("logits"), _expected(server, x, "1"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_infer_compressed_both_ways(server: ServerThread, client: th.InferenceServerClient, algorithm: str) -> None:
    x = _x(32, seed=2)  # 32x10 FP32 JSON response is large enough to be compressed
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        "toy", [inp], outputs=[th.InferRequestedOutput("logits", binary_data=False)],
        request_compression_algorithm=algorithm, response_compression_algorithm=algorithm,
    )
    np.testing.assert_allclose(result.as_numpy("logits"), _expected(server, x), rtol=1e-5, atol=1e-5)


def test_raw_json_request_and_compressed_response(server: ServerThread) -> None:
    x = _x(32, seed=3)  # the model's max batch size: the most rows one request may carry
    doc = {"inputs": [{"name": "input", "shape": [32, 64], "datatype": "FP32", "data": x.tolist()}]}
    status, headers, body = request(
        server.url, "POST", "/v2/models/toy/infer", gzip.compress(json.dumps(doc).encode()),
        {"Content-Encoding": "gzip", "Accept-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    out = json.loads(gzip.decompress(body))
    assert out["outputs"][0]["shape"] == [32, 10]
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(32, 10), _expected(server, x), rtol=1e-5, atol=1e-5)
    for h in ("X-Tandem-Queue-Us", "X-Tandem-Compute-Us", "X-Tandem-Batch-Size", "X-Tandem-Queue-Depth"):
        assert h in headers
    assert headers["X-Tandem-Model-Version"] == "2"


def test_errors_reach_tritonclient_with_a_message(client: th.InferenceServerClient) -> None:
    bad = th.InferInput("input", [2, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 63), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("toy", [bad])
    assert e.value.status() == "400" and "[-1, 64]" in e.value.message()
    wrong = th.InferInput("inputz", [1, 64], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("toy", [wrong])
    assert e.value.status() == "400" and "inputz" in e.value.message()
    i64 = th.InferInput("input", [1, 64], "INT64")
    i64.set_data_from_numpy(np.zeros((1, 64), np.int64))
    with pytest.raises(InferenceServerException) as e:
        client.infer("toy", [i64])
    assert "FP32" in e.value.message()
    ok = th.InferInput("input", [1, 64], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [ok])
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.infer("toy", [ok], model_version="9")
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.infer("toy", [ok], outputs=[th.InferRequestedOutput("nope")])
    assert "nope" in e.value.message()


def test_repository_index_lists_versions(client: th.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    states = {(m["name"], m["version"]): m["state"] for m in index}
    assert states[("toy", "1")] == states[("toy", "2")] == states[("varlen", "1")] == "READY"


def test_unknown_route_and_method_are_json_errors(server: ServerThread) -> None:
    status, _, body = request(server.url, "GET", "/v2/nothing")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = request(server.url, "GET", "/v2/models/toy/infer")
    assert status == 405 and "error" in json.loads(body)


def test_statistics_extension_counts_what_ran(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """tritonclient's get_inference_statistics (what perf_analyzer reads for its server-side
    breakdown) on a fresh server, so the counts are exactly this test's traffic."""
    repo = make_repository(tmp_path / "repo", keys[0], slow=False, varlen=False)
    with ServerThread(ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0)) as s:
        c = th.InferenceServerClient(s.url.removeprefix("http://"))
        try:
            assert "statistics" in c.get_server_metadata()["extensions"]
            before_ms = time.time() * 1e3
            x = _x(3)
            for _ in range(5):
                inp = th.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                c.infer("toy", [inp], model_version="2")
            bad = th.InferInput("input", [1, 63], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
            with pytest.raises(InferenceServerException):
                c.infer("toy", [bad], model_version="2")

            (st,) = c.get_inference_statistics("toy", "2")["model_stats"]
            assert (st["name"], st["version"]) == ("toy", "2")
            assert st["inference_count"] == 15 and 1 <= st["execution_count"] <= 5
            assert before_ms <= st["last_inference"] <= time.time() * 1e3 + 1
            inf = st["inference_stats"]
            assert inf["success"]["count"] == 5 and inf["fail"]["count"] == 1
            assert inf["queue"]["count"] == inf["compute_infer"]["count"] == 5
            assert inf["compute_infer"]["ns"] > 0 and inf["queue"]["ns"] >= 0
            assert abs(inf["success"]["ns"] - inf["queue"]["ns"] - inf["compute_infer"]["ns"]) <= 2
            assert inf["cache_hit"]["count"] == inf["cache_miss"]["count"] == 0  # no response cache configured

            by_version = {m["version"]: m for m in c.get_inference_statistics("toy")["model_stats"]}
            assert set(by_version) == {"1", "2"} and by_version["1"]["inference_count"] == 0
            everything = {(m["name"], m["version"]) for m in c.get_inference_statistics()["model_stats"]}
            assert {("toy", "1"), ("toy", "2")} <= everything
            with pytest.raises(InferenceServerException, match="unknown model"):
                c.get_inference_statistics("nope")
        finally:
            c.close()
