"""shared/v2.py: bodies built by the real tritonclient decode; responses decode with tritonclient."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as th
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.http._utils import _get_inference_request

from tandem.shared import v2
from tandem.shared.errors import InvalidInput, TensorCodecError


def _triton_body(inputs: list[th.InferInput], outputs: list[th.InferRequestedOutput] | None = None, **kw: object) -> tuple[bytes, int | None]:
    body, json_size = _get_inference_request(
        inputs=inputs, request_id=kw.get("request_id", ""), outputs=outputs, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=kw.get("priority", 0), timeout=kw.get("timeout"), custom_parameters=None,
    )
    return (body.encode() if isinstance(body, str) else body), json_size


def _input(name: str, arr: np.ndarray, datatype: str, binary: bool = True) -> th.InferInput:
    i = th.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr, binary_data=binary)
    return i


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_requests_decode_for_every_datatype(binary: bool) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "f32": (rng.standard_normal((2, 3)).astype(np.float32), "FP32"),
        "f64": (rng.standard_normal((4,)).astype(np.float64), "FP64"),
        "i64": (rng.integers(-9, 9, (3, 1)).astype(np.int64), "INT64"),
        "u8": (rng.integers(0, 255, (2, 2)).astype(np.uint8), "UINT8"),
        "b": (np.array([[True, False, True]]), "BOOL"),
        "s": (np.array([b"ab", b"", "\u00e9".encode()], dtype=object), "BYTES"),
    }
    if binary:  # tritonclient sends FP16 only as binary
        arrays["f16"] = (rng.standard_normal((2,)).astype(np.float16), "FP16")
    inputs = [_input(n, a, dt, binary) for n, (a, dt) in arrays.items()]
    body, hl = _triton_body(inputs, priority=2, timeout=1500, request_id="r1")
    req = v2.parse_infer_request(body, hl)
    assert req.id == "r1" and req.priority() == 2 and req.timeout_us() == 1500
    assert req.outputs is None and req.binary_output is True
    for name, (arr, _) in arrays.items():
        got = req.inputs[name]
        assert got.shape == arr.shape
        if arr.dtype == object:
            assert list(got.reshape(-1)) == list(arr.reshape(-1))
        else:
            assert got.dtype == arr.dtype and np.array_equal(got, arr)


def test_response_decodes_with_tritonclient_binary_and_json() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    names = np.array([b"x", b"yz"], dtype=object)
    inp = _input("in", np.zeros((2, 3), np.float32), "FP32")
    body, hl = _triton_body(
        [inp], [th.InferRequestedOutput("logits", binary_data=True), th.InferRequestedOutput("names", binary_data=False)]
    )
    req = v2.parse_infer_request(body, hl)
    out, headers = v2.encode_infer_response("m", "3", {"logits": logits, "names": names, "unused": logits}, request=req)
    result = th.InferResult.from_response_body(out, header_length=int(headers[v2.HEADER_LENGTH]))
    assert np.array_equal(result.as_numpy("logits"), logits)
    assert list(result.as_numpy("names")) == ["x", "yz"] or list(result.as_numpy("names")) == [b"x", b"yz"]
    assert result.as_numpy("unused") is None
    assert result.get_response()["model_version"] == "3"
    out, headers = v2.encode_infer_response("m", "3", {"logits": logits})
    assert headers["Content-Type"] == v2.JSON_CONTENT_TYPE and v2.HEADER_LENGTH not in headers
    doc = json.loads(out)
    assert doc["outputs"][0]["data"] == logits.reshape(-1).tolist()


@pytest.mark.parametrize(
    "body,hl,message",
    [
        (b"not json", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty list"),
        (b'{"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [1]}]}', None, "needs 2 elements"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [1.5]}]}', None, "integers"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [300]}]}', None, "do not fit"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP99", "data": [1]}]}', None, "unknown datatype"),
        (b'{"inputs": [{"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}', None, "no 'data'"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}, {"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "twice"),
        (b'{"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}abcd', 95, "runs past"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}abcdEXTRA', 95, "not claimed"),
        (b'{"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}abcd', 95, "needs 8 bytes"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}', 9999, "body has"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}', "x", "integer"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}\x09\x00\x00\x00ab', 96, "runs past"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "o", "parameters": {"classification": 3}}]}', None, "classification"),
    ],
)
def test_bad_requests_name_the_problem(body: bytes, hl: object, message: str) -> None:
    if isinstance(hl, int) and hl != 9999:
        hl = body.index(b"}]}") + 3
    with pytest.raises(InvalidInput) as e:
        v2.parse_infer_request(body, hl)  # type: ignore[arg-type]
    assert message in str(e.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400)))
def test_garbage_raises_only_invalid_input(body: bytes, hl: int | None) -> None:
    try:
        v2.parse_infer_request(body, hl)
    except InvalidInput:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"name": st.text(min_size=1, max_size=3), "shape": st.lists(st.integers(-1, 3), max_size=3),
             "datatype": st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", "X"]),
             "data": st.recursive(st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.text(max_size=3), st.none()),
                                  lambda c: st.lists(c, max_size=4), max_leaves=10)}
        ),
        max_size=3,
    )
)
def test_structured_garbage_raises_only_invalid_input(inputs: list[dict[str, object]]) -> None:
    try:
        req = v2.parse_infer_request(json.dumps({"inputs": inputs}).encode())
    except (InvalidInput, TensorCodecError):
        return
    for arr in req.inputs.values():
        assert isinstance(arr, np.ndarray)
