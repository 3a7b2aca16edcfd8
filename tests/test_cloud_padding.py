"""Serving sequence models: requests of different lengths share a batch, padded, through the real server.

The models are small ONNX graphs made here (int64 token ids and an attention mask along a dynamic
``sequence`` axis): the batcher pads them to the longest request with the manifest's pad values,
cuts the per-token output back to each request's length, and every answer must equal what
onnxruntime gives for that request alone. Batches are made deterministic by the queue delay: the
instance waits (up to seconds) for ``max_batch_size`` rows, and the tests send exactly that many.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud_support import ServerThread, make_onnx_bundle
from support import make_bundle, save_onnx
from tandem.cloud.batcher import MAX_PADDING_RATIO
from tandem.cloud.config import BatchingConfig, ServerConfig
from tandem.cloud.engine import ModelEngine
from tandem.shared import protocol as p
from tandem.shared.bundle import TensorSpec
from tandem.shared.tensors import unpackb

VOCAB, WIDTH = 50, 8
#: Long enough that every request of a test is queued before its batch's wait ends, even on a
#: loaded machine; a batch that fills (max_batch_size rows) runs at once.
DELAY_US = 3_000_000


def make_embed_onnx(path: Path) -> Path:
    """input_ids, attention_mask INT64 [batch, sequence] -> hidden FP32 [batch, sequence, 8] (per
    token), embedding FP32 [batch, 8] (the mean of hidden over the tokens the mask keeps)."""
    rng = np.random.default_rng(7)
    table = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["hidden"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["hidden", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["safe"]),
        helper.make_node("Div", ["total", "safe"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embed",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", WIDTH]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", WIDTH]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        ],
    )
    return save_onnx(graph, path)


def _specs(pad: float | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [
            TensorSpec(name="input_ids", datatype="INT64", shape=["batch", "sequence"], pad=pad),
            TensorSpec(name="attention_mask", datatype="INT64", shape=["batch", "sequence"], pad=pad),
        ],
        [
            TensorSpec(name="embedding", datatype="FP32", shape=["batch", WIDTH]),
            TensorSpec(name="hidden", datatype="FP32", shape=["batch", "sequence", WIDTH]),
        ],
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    """REPO/embed/1 (pad 0), REPO/exact/1 (the same graph, pad None), REPO/toy/1 (fixed [batch, 64])."""
    root = tmp_path_factory.mktemp("repo")
    onnx_path = make_embed_onnx(root / "embed.onnx")
    for name, pad in (("embed", 0.0), ("exact", None)):
        make_onnx_bundle(root / name / "1", keys[0], onnx_path, name, "1", *_specs(pad))
    make_bundle(root / "toy" / "1", keys[0], name="toy", version="1")
    return root


@pytest.fixture(scope="module")
def session(repo: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(repo / "embed.onnx"), providers=["CPUExecutionProvider"])


async def _server(repo: Path, keys: tuple[Path, Path], batching: BatchingConfig) -> ServerThread:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1], batching=batching, instances=1)
    return await asyncio.to_thread(ServerThread(config).start)


def _tokens(rows: int, length: int, seed: int, real: int | None = None) -> dict[str, np.ndarray]:
    """Token ids and a mask of ``length`` tokens; the mask keeps the first ``real`` (all by default)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (rows, length), dtype=np.int64)
    mask = np.zeros((rows, length), np.int64)
    mask[:, : length if real is None else real] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _alone(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


# --- the two protocols, three encodings --------------------------------------------------------


async def _native(http: aiohttp.ClientSession, url: str, model: str, inputs: dict[str, np.ndarray]) -> tuple[int, dict[str, Any]]:
    async with http.post(url + p.infer_path(model), data=p.InferRequest(inputs).to_wire()) as r:
        raw = await r.read()
        if r.status != 200:
            return r.status, unpackb(raw)
        return r.status, p.InferResponse.from_wire(raw).outputs


async def _v2(http: aiohttp.ClientSession, url: str, model: str, inputs: dict[str, np.ndarray], binary: bool) -> tuple[int, dict[str, Any]]:
    datatype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}
    head: dict[str, Any] = {"inputs": [], "outputs": [{"name": "embedding"}, {"name": "hidden"}]}
    blobs = b""
    for name, arr in inputs.items():
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype[arr.dtype]}
        if binary:
            data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs += data
        else:
            entry["data"] = arr.ravel().tolist()
        head["inputs"].append(entry)
    if binary:
        for out in head["outputs"]:
            out["parameters"] = {"binary_data": True}
    text = json.dumps(head).encode()
    headers = {"Inference-Header-Content-Length": str(len(text))} if binary else {"Content-Type": "application/json"}
    async with http.post(f"{url}/v2/models/{model}/infer", data=text + blobs, headers=headers) as r:
        raw = await r.read()
        if r.status != 200:
            return r.status, json.loads(raw)
        length = int(r.headers.get("Inference-Header-Content-Length", len(raw)))
    doc = json.loads(raw[:length])
    outputs, offset = {}, length
    for out in doc["outputs"]:
        if "data" in out:
            outputs[out["name"]] = np.asarray(out["data"], np.float32).reshape(out["shape"])
        else:
            size = out["parameters"]["binary_data_size"]
            outputs[out["name"]] = np.frombuffer(raw[offset : offset + size], "<f4").reshape(out["shape"])
            offset += size
    return 200, outputs


async def _infer(http: aiohttp.ClientSession, url: str, model: str, inputs: dict[str, np.ndarray], how: str) -> tuple[int, dict[str, Any]]:
    if how == "native":
        return await _native(http, url, model, inputs)
    return await _v2(http, url, model, inputs, binary=how == "v2-binary")


_PROTOCOLS = ("native", "v2-binary", "v2-json")


def _metric(s: ServerThread, name: str, model: str) -> float:
    text = s.state.metrics.render().decode()
    m = re.search(rf'^{name}{{model="{model}",version="1"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _check(session: ort.InferenceSession, inputs: dict[str, np.ndarray], status: int, got: dict[str, Any]) -> None:
    assert status == 200, got
    want = _alone(session, inputs)
    assert got["hidden"].shape == want["hidden"].shape  # cut back to this request's own length
    for name in ("embedding", "hidden"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


# --- tests --------------------------------------------------------------------------------------


def test_the_engine_keeps_names_and_pad_values_and_metadata_keeps_minus_one(repo: Path) -> None:
    from tandem.shared.bundle import load_bundle

    bundle = load_bundle(repo / "embed" / "1", verify_signature=False)
    engine = ModelEngine(
        bundle.variant_path("cloud"), declared_inputs=bundle.manifest.inputs, declared_outputs=bundle.manifest.outputs
    )
    ids = engine.input_by_name["input_ids"]
    assert ids.symbols == ("batch", "sequence") and ids.pad == 0.0 and ids.wire_shape == [-1, -1]
    assert engine.pad_symbols == ("sequence",)
    assert engine.unpad_axes == {"hidden": ((1, 0),)}
    # Without a manifest, the ONNX graph's dim_param names; without pad values, nothing is padded.
    plain = ModelEngine(repo / "embed.onnx")
    assert plain.input_by_name["input_ids"].symbols == ("batch", "sequence") and plain.pad_symbols == ()


async def test_mixed_lengths_share_one_padded_batch_over_both_protocols(
    repo: Path, keys: tuple[Path, Path], session: ort.InferenceSession
) -> None:
    # Lengths 30-32: any of them padded to 32 computes at most 1.07 elements per element sent,
    # within the bound; one request of 3 rows, one whose mask keeps fewer tokens than it sends.
    requests = [
        _tokens(1, 30, 0), _tokens(3, 32, 1), _tokens(1, 31, 2, real=5), _tokens(1, 30, 3),
        _tokens(1, 32, 4), _tokens(1, 31, 5), _tokens(1, 30, 6), _tokens(1, 32, 7),
    ]
    rows = sum(len(r["input_ids"]) for r in requests)
    s = await _server(repo, keys, BatchingConfig(max_batch_size=rows, max_queue_delay_us=DELAY_US))
    try:
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(
                *(_infer(http, s.url, "embed", x, _PROTOCOLS[i % 3]) for i, x in enumerate(requests))
            )
        for x, (status, got) in zip(requests, results):
            _check(session, x, status, got)
        assert _metric(s, "tandem_inference_exec_count_total", "embed") == 1  # one batch
        assert _metric(s, "tandem_inference_count_total", "embed") == rows
        sent = sum(2 * r["input_ids"].size for r in requests)
        assert _metric(s, "tandem_inference_input_elements_total", "embed") == sent
        assert _metric(s, "tandem_inference_padded_input_elements_total", "embed") == 2 * rows * 32
        assert _metric(s, "tandem_inference_batch_padding_ratio_count", "embed") == 1
        assert "tandem_inference_batch_padding_ratio_bucket" in s.state.metrics.render().decode()
    finally:
        await asyncio.to_thread(s.stop)


async def test_lengths_too_far_apart_run_in_separate_batches(
    repo: Path, keys: tuple[Path, Path], session: ort.InferenceSession
) -> None:
    # 4 tokens padded to 60 or more would compute over 1.2 elements per element sent: beyond the
    # bound, whichever request comes first; 60-64 padded to 64 compute 1.03.
    assert MAX_PADDING_RATIO == BatchingConfig().max_padding_ratio < 1.2
    requests = [_tokens(1, 64, 0), _tokens(1, 4, 1), _tokens(1, 62, 2), _tokens(1, 60, 3)]
    s = await _server(repo, keys, BatchingConfig(max_batch_size=4, max_queue_delay_us=DELAY_US))
    try:
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(*(_infer(http, s.url, "embed", x, "native") for x in requests))
        for x, (status, got) in zip(requests, results):
            _check(session, x, status, got)
        assert _metric(s, "tandem_inference_exec_count_total", "embed") == 2  # {64, 62, 60} and {4}
        assert _metric(s, "tandem_inference_padded_input_elements_total", "embed") == 2 * (3 * 64 + 4)
    finally:
        await asyncio.to_thread(s.stop)


async def test_a_padding_bound_of_one_batches_equal_lengths_only(
    repo: Path, keys: tuple[Path, Path], session: ort.InferenceSession
) -> None:
    requests = [_tokens(1, 64, 0), _tokens(1, 63, 1), _tokens(1, 64, 2)]
    s = await _server(repo, keys, BatchingConfig(max_batch_size=3, max_queue_delay_us=DELAY_US, max_padding_ratio=1.0))
    try:
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(*(_infer(http, s.url, "embed", x, "native") for x in requests))
        for x, (status, got) in zip(requests, results):
            _check(session, x, status, got)
        assert _metric(s, "tandem_inference_exec_count_total", "embed") == 2  # {64, 64} and {63}
        assert _metric(s, "tandem_inference_padded_input_elements_total", "embed") == 2 * (64 + 63 + 64)
    finally:
        await asyncio.to_thread(s.stop)


async def test_without_pad_values_requests_group_by_exact_shape(
    repo: Path, keys: tuple[Path, Path], session: ort.InferenceSession
) -> None:
    lengths = [7, 9, 7, 9, 7, 8]
    requests = [_tokens(1, n, i) for i, n in enumerate(lengths)]
    s = await _server(repo, keys, BatchingConfig(max_batch_size=len(requests), max_queue_delay_us=DELAY_US))
    try:
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(*(_infer(http, s.url, "exact", x, _PROTOCOLS[i % 3]) for i, x in enumerate(requests)))
        for x, (status, got) in zip(requests, results):
            _check(session, x, status, got)
        assert _metric(s, "tandem_inference_exec_count_total", "exact") == len(set(lengths))  # one batch per shape
        assert _metric(s, "tandem_inference_padded_input_elements_total", "exact") == 0  # never padded
    finally:
        await asyncio.to_thread(s.stop)


@pytest.mark.parametrize("how", _PROTOCOLS)
async def test_requests_violating_the_signature_get_400_and_all_others_are_served(
    repo: Path, keys: tuple[Path, Path], session: ort.InferenceSession, how: str
) -> None:
    s = await _server(repo, keys, BatchingConfig())
    ids, mask = np.ones((1, 5), np.int64), np.ones((1, 5), np.int64)
    refused = [
        ("embed", {"input_ids": ids.astype(np.int32), "attention_mask": mask}, "bad_tensor", "input 'input_ids' must be INT64"),
        ("embed", {"input_ids": ids.reshape(1, 5, 1), "attention_mask": mask},
         "invalid_input", "input 'input_ids' must have 2 dimensions [-1, -1] = [batch, sequence], got 3"),
        ("embed", {"input_ids": ids, "attention_mask": np.ones((1, 6), np.int64)},
         "invalid_input", "inputs 'input_ids' and 'attention_mask' share the axis 'sequence' but have lengths 5 and 6"),
        ("embed", {"input_ids": ids, "attention_mask": np.ones((2, 5), np.int64)},
         "invalid_input", "all inputs must have the same batch (first) dimension"),
        ("toy", {"input": np.zeros((1, 63), np.float32)}, "invalid_input", "must have shape [-1, 64] = [batch, 64], got [1, 63]"),
    ]
    try:
        async with aiohttp.ClientSession() as http:
            for model, inputs, code, message in refused:
                if how != "native" and model == "toy":
                    continue  # _v2 asks for the embed model's outputs
                status, body = await _infer(http, s.url, model, inputs, how)
                assert status == 400 and body["code"] == code and message in body["error"], (inputs, body)
            accepted = [_tokens(3, 1, 0), _tokens(1, 100, 1), _tokens(2, 17, 2, real=0)]
            for x in accepted:
                _check(session, x, *await _infer(http, s.url, "embed", x, how))
    finally:
        await asyncio.to_thread(s.stop)


async def test_v2_metadata_reports_dynamic_dims_as_minus_one(repo: Path, keys: tuple[Path, Path]) -> None:
    s = await _server(repo, keys, BatchingConfig())
    try:
        async with aiohttp.ClientSession() as http, http.get(s.url + "/v2/models/embed") as r:
            doc = await r.json()
        assert {t["name"]: t["shape"] for t in doc["inputs"]} == {"input_ids": [-1, -1], "attention_mask": [-1, -1]}
        assert {t["name"]: t["shape"] for t in doc["outputs"]} == {"embedding": [-1, WIDTH], "hidden": [-1, -1, WIDTH]}
    finally:
        await asyncio.to_thread(s.stop)
