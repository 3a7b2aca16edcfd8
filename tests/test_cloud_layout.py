"""The codecs' fast paths (cloud/layout.py) against the full codec they stand in for."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tandem.cloud.layout import RequestDecoder, ResponseEncoder, V2RequestDecoder, V2ResponseEncoder
from tandem.shared import v2
from tandem.shared.errors import TandemError
from tandem.shared.protocol import InferRequest, InferResponse

_dtypes = st.sampled_from([np.float32, np.float16, np.int64, np.uint8, np.bool_, np.float64])
_arrays = _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)))
_names = st.text(min_size=1, max_size=8)
_ids = st.none() | st.text(max_size=40)
_deadlines = st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 10_000)


def _outcome(fn: Any) -> Any:
    """What decoding gives, comparable: the request's fields (native or v2), or the error's type."""
    try:
        req = fn()
    except TandemError as e:
        return type(e)
    inputs = {n: (a.dtype.str, a.shape, a.tobytes()) for n, a in req.inputs.items()}
    if isinstance(req, v2.V2Request):
        outputs = [(o.name, o.binary) for o in req.outputs] if req.outputs is not None else None
        return (inputs, req.id, req.parameters, outputs, req.binary_output)
    deadline = req.deadline_ms
    if deadline is not None and math.isnan(deadline):
        deadline = "nan"
    return (inputs, req.id, req.outputs, deadline, req.priority, req.parameters)


def _request(inputs: dict[str, np.ndarray], rid: str | None, deadline: float | None, **kw: Any) -> bytes:
    msg: dict[str, Any] = {"inputs": {n: {"datatype": _dt(a), "shape": list(a.shape), "data": a.tobytes()} for n, a in inputs.items()}}
    if rid is not None:
        msg["id"] = rid
    if deadline is not None:
        msg["deadline_ms"] = deadline
    msg.update(kw)
    return msgpack.packb(msg, use_bin_type=True)


def _dt(a: np.ndarray) -> str:
    return {"float32": "FP32", "float16": "FP16", "int64": "INT64", "uint8": "UINT8", "bool": "BOOL", "float64": "FP64"}[a.dtype.name]


def _same_layout(inputs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Other values, same names, datatypes and shapes."""
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 2, a.shape).astype(a.dtype) if a.dtype == np.bool_ else (rng.random(a.shape) * 100).astype(a.dtype) for n, a in inputs.items()}


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_names, _arrays, min_size=1, max_size=3), _ids, _deadlines, st.data())
def test_a_learned_layout_decodes_what_the_full_codec_decodes(
    inputs: dict[str, np.ndarray], rid: str | None, deadline: Any, data: st.DataObject
) -> None:
    decoder = RequestDecoder()
    first = _request(inputs, rid, deadline)
    assert _outcome(lambda: decoder.decode(first)) == _outcome(lambda: InferRequest.from_wire(first))
    # Mostly the same layout (the fields present and their kinds), sometimes not.
    rid2 = data.draw(_ids if rid is None or data.draw(st.booleans()) else st.text(max_size=40))
    same_kind = st.none() if deadline is None else st.integers(0, 10_000) if isinstance(deadline, int) else st.floats()
    deadline2 = data.draw(_deadlines | same_kind if data.draw(st.booleans()) else same_kind)
    second = _request(_same_layout(inputs, data.draw(st.integers(0, 2**31))), rid2, deadline2)
    assert _outcome(lambda: decoder.decode(memoryview(second))) == _outcome(lambda: InferRequest.from_wire(second))


def test_the_layout_is_used_for_the_next_request_and_ids_and_deadlines_vary() -> None:
    decoder = RequestDecoder()
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    decoder.decode(_request({"input": x}, "a", 100.0))
    assert len(decoder._layouts) == 1
    layout = decoder._layouts[0]
    y = x + 1
    got = layout.match(_request({"input": y}, "a much longer request id", 2.5))
    assert got is not None and got.id == "a much longer request id" and got.deadline_ms == 2.5
    assert np.array_equal(got.inputs["input"], y) and not got.inputs["input"].flags.writeable
    # Another shape, datatype, name or field is another layout.
    assert layout.match(_request({"input": x[:, :32]}, "a", 100.0)) is None
    assert layout.match(_request({"input": x.astype(np.float64)}, "a", 100.0)) is None
    assert layout.match(_request({"inputz": x}, "a", 100.0)) is None
    assert layout.match(_request({"input": x}, "a", 100.0, priority=1)) is None
    assert layout.match(_request({"input": x}, "a", 100)) is None  # an int deadline: not the float64 hole


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=4), st.integers(0, 10_000), st.sampled_from(["flip", "insert", "delete"]))
def test_a_corrupted_body_is_refused_as_the_full_codec_refuses_it(junk: bytes, where: int, how: str) -> None:
    decoder = RequestDecoder()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    body = _request({"input": x, "mask": np.ones((3, 1), np.bool_)}, "req-1", 50.0, outputs=["logits"], parameters={"k": 1})
    decoder.decode(body)
    assert decoder._layouts
    i = where % len(body)
    if how == "flip":
        bad = body[:i] + junk + body[i + len(junk) :]
        bad = bad[: len(body)]
    elif how == "insert":
        bad = body[:i] + junk + body[i:]
    else:
        bad = body[:i] + body[i + len(junk) :]
    assert _outcome(lambda: decoder.decode(bad)) == _outcome(lambda: InferRequest.from_wire(bad))


def test_bytes_tensors_repeated_keys_and_large_bodies_take_the_full_path() -> None:
    decoder = RequestDecoder()
    strings = msgpack.packb({"inputs": {"text": {"datatype": "BYTES", "shape": [1], "data": [b"hi"]}}}, use_bin_type=True)
    assert decoder.decode(strings).inputs["text"][0] == b"hi"
    assert not decoder._layouts
    # msgpack maps may repeat a key (the last wins): no layout, the full decode says what it means.
    a, b = np.zeros((1, 2), np.float32), np.ones((1, 2), np.float32)
    one = _request({"input": a}, None, None)
    repeated = one[:1] + msgpack.packb("inputs") + msgpack.packb({"input": {"datatype": "FP32", "shape": [1, 2], "data": b.tobytes()}}) + one[1:]
    repeated = bytes([0x82]) + repeated[1:]
    assert np.array_equal(decoder.decode(repeated).inputs["input"], InferRequest.from_wire(repeated).inputs["input"])
    assert not decoder._layouts
    big = _request({"input": np.zeros((1, 20_000), np.float32)}, None, None)
    decoder.decode(big)
    assert not decoder._layouts


def test_a_client_whose_layout_changes_every_call_does_not_build_a_layout_every_call() -> None:
    decoder = RequestDecoder()
    built = 0
    for n in range(1, 65):
        decoder.decode(_request({"input": np.zeros((1, n), np.float32)}, None, None))
        built += decoder._layouts[0].segments[0] != b"" and decoder._layouts[0].holes[0][4] == (1, n)
    assert built == 4  # every 16th miss
    assert len(decoder._layouts) == 4


_outputs = st.dictionaries(_names, _arrays | hnp.arrays(np.dtype(">f4"), (2, 2)) | st.just(np.arange(12.0).reshape(3, 4)[:, ::2]), max_size=3)


@settings(max_examples=200, deadline=None)
@given(_outputs, st.text(max_size=20), st.text(max_size=5), _ids)
def test_the_encoder_writes_the_bytes_to_wire_writes(outputs: dict[str, np.ndarray], model: str, version: str, rid: str | None) -> None:
    encoder = ResponseEncoder()
    want = InferResponse(outputs, model, version, id=rid).to_wire()
    assert encoder.encode(outputs, model, version, rid) == want
    assert encoder.encode(outputs, model, version, rid) == want  # from the cached prefix


def test_the_encoder_keeps_a_bounded_number_of_layouts() -> None:
    encoder = ResponseEncoder(max_layouts=3)
    for n in range(10):
        out = {"y": np.zeros((n, 2), np.float32)}
        assert encoder.encode(out, "m", "1", "r") == InferResponse(out, "m", "1", id="r").to_wire()
        assert len(encoder._prefixes) <= 3


@pytest.mark.parametrize("body", [b"", b"\x80", b"\xc1", b"\x81\xa6inputs\x80"])
def test_bad_bodies_raise_the_codec_errors(body: bytes) -> None:
    assert _outcome(lambda: RequestDecoder().decode(body)) == _outcome(lambda: InferRequest.from_wire(body))


# --- v2 binary tensors ---------------------------------------------------------------------------



def _v2_body(inputs: dict[str, np.ndarray], json_inputs: dict[str, np.ndarray] | None = None, **doc: Any) -> tuple[bytes, str]:
    entries, blobs = [], []
    for n, a in inputs.items():
        entries.append({"name": n, "shape": list(a.shape), "datatype": _dt(a), "parameters": {"binary_data_size": a.nbytes}})
        blobs.append(a.tobytes())
    for n, a in (json_inputs or {}).items():
        entries.append({"name": n, "shape": list(a.shape), "datatype": _dt(a), "data": a.reshape(-1).tolist()})
    header = msgpack_free_json({"inputs": entries, **doc})
    return header + b"".join(blobs), str(len(header))


def msgpack_free_json(doc: dict[str, Any]) -> bytes:
    import json

    return json.dumps(doc).encode()


_v2_arrays = st.sampled_from([np.float32, np.int64, np.uint8, np.float16]).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
)
_v2_docs = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=10),
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": st.booleans(), "priority": st.integers(0, 3)}),
    "outputs": st.lists(st.fixed_dictionaries({"name": _names}, optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})}), max_size=2),
})


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_names, _v2_arrays, min_size=1, max_size=3), _v2_docs, st.integers(0, 2**31))
def test_a_repeated_v2_header_decodes_what_the_full_parser_decodes(inputs: dict[str, np.ndarray], doc: dict[str, Any], seed: int) -> None:
    decoder = V2RequestDecoder()
    body, hl = _v2_body(inputs, **doc)
    assert _outcome(lambda: decoder.decode(body, hl)) == _outcome(lambda: v2.parse_infer_request(body, hl))
    again, hl2 = _v2_body(_same_layout(inputs, seed), **doc)
    assert hl2 == hl and len(decoder._plans) == 1
    assert _outcome(lambda: decoder.decode(memoryview(again), hl)) == _outcome(lambda: v2.parse_infer_request(again, hl))
    # The same header with a binary part of another length is refused as the full parser refuses it.
    for bad in (again[:-1], again + b"\0"):
        assert _outcome(lambda bad=bad: decoder.decode(bad, hl)) == _outcome(lambda bad=bad: v2.parse_infer_request(bad, hl))


def test_v2_json_data_bool_and_bytes_inputs_are_never_planned() -> None:
    decoder = V2RequestDecoder()
    x = np.ones((1, 3), np.float32)
    for body, hl in (
        _v2_body({"a": x}, json_inputs={"b": np.array([[1.0, 2.0]], np.float32)}),
        _v2_body({"a": x, "m": np.array([[True, False]])}),
    ):
        first = decoder.decode(body, hl)
        assert _outcome(lambda first=first: first) == _outcome(lambda body=body, hl=hl: v2.parse_infer_request(body, hl))
    assert not decoder._plans
    # An empty JSON input is fixed by the header: planning it is sound.
    body, hl = _v2_body({"a": x}, json_inputs={"e": np.zeros((0, 2), np.float32)})
    decoder.decode(body, hl)
    assert _outcome(lambda: decoder.decode(body, hl)) == _outcome(lambda: v2.parse_infer_request(body, hl))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_names, _arrays | hnp.arrays(np.dtype(">f4"), (2, 2)), min_size=1, max_size=3), _v2_docs)
def test_the_v2_encoder_writes_what_encode_infer_response_writes(outputs: dict[str, np.ndarray], doc: dict[str, Any]) -> None:
    body, hl = _v2_body({"x": np.zeros((1, 1), np.float32)}, **doc)
    req = v2.parse_infer_request(body, hl)
    encoder = V2ResponseEncoder()
    want = _v2_outcome_response(lambda: v2.encode_infer_response("m", "1", outputs, request=req, id=req.id))
    for _ in range(2):  # building the header, then from the cache
        assert _v2_outcome_response(lambda: encoder.encode("m", "1", outputs, req)) == want


def _v2_outcome_response(fn: Any) -> Any:
    try:
        return fn()
    except (TandemError, KeyError) as e:
        return type(e)


def test_the_v2_encoder_keeps_one_header_per_layout_and_id() -> None:
    encoder = V2ResponseEncoder()
    out = {"y": np.arange(4, dtype=np.float32).reshape(1, 4)}
    for rid in ("a", "bb", None, "a"):
        for n in (1, 2):
            body, hl = _v2_body({"x": np.zeros((n, 1), np.float32)}, id=rid, parameters={"binary_data_output": True}) if rid else \
                _v2_body({"x": np.zeros((n, 1), np.float32)}, parameters={"binary_data_output": True})
            req = v2.parse_infer_request(body, hl)
            y = np.repeat(out["y"], n, axis=0)
            assert encoder.encode("m", "1", {"y": y}, req) == v2.encode_infer_response("m", "1", {"y": y}, request=req, id=req.id)
    assert len(encoder._headers) == 6
