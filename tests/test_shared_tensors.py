from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tandem.shared.errors import InvalidInput, TensorCodecError
from tandem.shared.protocol import InferRequest, InferResponse, ServerTiming
from tandem.shared.tensors import (
    DATATYPE_TO_DTYPE,
    datatype_of,
    decode_tensor,
    decode_tensors,
    dtype_of,
    encode_tensor,
    packb,
    unpackb,
)

NUMERIC = [dt for name, dt in DATATYPE_TO_DTYPE.items() if name != "BYTES"]


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(NUMERIC),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_numeric_round_trip(arr: np.ndarray) -> None:
    back = decode_tensor(unpackb(packb(encode_tensor(arr))))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=20), min_size=0, max_size=12))
def test_bytes_round_trip(values: list[bytes]) -> None:
    arr = np.array(values + [b""] * (12 - len(values)), dtype=object).reshape(3, 4)
    back = decode_tensor(unpackb(packb(encode_tensor(arr))))
    assert back.shape == (3, 4) and list(back.reshape(-1)) == list(arr.reshape(-1))


def test_big_endian_and_non_contiguous_are_normalised() -> None:
    arr = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    back = decode_tensor(unpackb(packb(encode_tensor(arr))))
    assert back.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back, arr)


def test_payload_is_raw_bytes_not_per_element() -> None:
    arr = np.zeros((100, 64), np.float32)
    wire = packb(encode_tensor(arr))
    # 25,600 data bytes plus a small header: no per-element encoding, no base64.
    assert len(wire) < arr.nbytes + 64


def test_decode_is_zero_copy_view() -> None:
    wire = packb(encode_tensor(np.arange(6, dtype=np.int32)))
    back = decode_tensor(unpackb(wire))
    assert not back.flags.owndata and not back.flags.writeable


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"datatype": "FP99", "shape": [1], "data": b"\0" * 4}, "unknown datatype 'FP99'"),
        ({"datatype": "FP32", "shape": [2, 2], "data": b"\0" * 12}, "needs 16 bytes, got 12"),
        ({"datatype": "FP32", "shape": [-1], "data": b""}, "non-negative integers"),
        ({"datatype": "FP32", "shape": "2", "data": b""}, "shape must be a list"),
        ({"datatype": "FP32", "shape": [1], "data": [1.0]}, "data must be raw bytes"),
        ({"datatype": "FP32", "shape": [1]}, "missing field(s) data"),
        ({"datatype": "BYTES", "shape": [2], "data": [b"a"]}, "needs 2 elements, got 1"),
        ({"datatype": "BYTES", "shape": [1], "data": [3]}, "must be bytes or str"),
        ({"datatype": "INT8", "shape": [1 << 20, 1 << 20], "data": b""}, "more than"),
        ([1, 2], "expected a map"),
    ],
)
def test_malformed_tensor_names_the_problem(obj: object, message: str) -> None:
    with pytest.raises(TensorCodecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_tensor(obj)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_raise_codec_error_only(data: bytes) -> None:
    try:
        obj = unpackb(data)
    except TensorCodecError:
        return
    try:
        decode_tensors(obj)
        InferRequest.from_wire(data)
    except InvalidInput:  # TensorCodecError is an InvalidInput
        pass


tensor_like = st.fixed_dictionaries(
    {
        "datatype": st.one_of(st.sampled_from(list(DATATYPE_TO_DTYPE)), st.text(max_size=5), st.integers()),
        "shape": st.one_of(st.lists(st.integers(-3, 6), max_size=3), st.text(max_size=3), st.none()),
        "data": st.one_of(st.binary(max_size=64), st.lists(st.binary(max_size=3), max_size=4), st.integers()),
    }
)


@settings(max_examples=300, deadline=None)
@given(tensor_like)
def test_structured_garbage_raises_codec_error_only(obj: dict) -> None:
    try:
        arr = decode_tensor(obj)
    except TensorCodecError:
        return
    assert arr.shape == tuple(obj["shape"])


def test_dtype_table() -> None:
    assert datatype_of(np.float32) == "FP32" and datatype_of(np.bool_) == "BOOL"
    assert datatype_of(np.dtype("U3")) == "BYTES"
    assert dtype_of("INT64") == np.dtype("<i8")
    with pytest.raises(TensorCodecError, match="no Open Inference Protocol datatype"):
        datatype_of(np.complex64)


def test_infer_request_round_trip_and_validation() -> None:
    req = InferRequest(inputs={"x": np.ones((2, 3), np.float32)}, id="r1", outputs=["y"], deadline_ms=12.5, priority=1)
    back = InferRequest.from_wire(req.to_wire())
    assert back.id == "r1" and back.outputs == ["y"] and back.deadline_ms == 12.5 and back.priority == 1
    np.testing.assert_array_equal(back.inputs["x"], req.inputs["x"])
    with pytest.raises(InvalidInput, match="no 'inputs'"):
        InferRequest.from_wire(packb({"id": "x"}))
    with pytest.raises(InvalidInput, match="unknown request field"):
        InferRequest.from_wire(packb({"inputs": {}, "bogus": 1}))
    with pytest.raises(InvalidInput, match="deadline_ms"):
        InferRequest.from_wire(packb({"inputs": {}, "deadline_ms": "soon"}))
    with pytest.raises(InvalidInput, match="msgpack map"):
        InferRequest.from_wire(msgpack.packb([1, 2]))


def test_response_and_timing_headers() -> None:
    resp = InferResponse(outputs={"y": np.arange(3, dtype=np.int64)}, model_name="m", model_version="2", id="a")
    back = InferResponse.from_wire(resp.to_wire())
    assert back.model_version == "2" and back.id == "a"
    t = ServerTiming(queue_us=12, compute_us=340, batch_size=8, queue_depth=3, cost=0.0001)
    assert ServerTiming.from_headers(t.to_headers()) == t
    assert ServerTiming.from_headers({"X-Tandem-Batch-Size": "nope"}).batch_size is None
