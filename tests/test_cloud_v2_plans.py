"""The v2 decoder's remembered JSON headers (cloud/v2.py) against the full parser they stand in for."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tandem.cloud.v2 import _V2
from tandem.shared import v2
from tandem.shared.errors import TandemError, TensorCodecError

_names = st.text(min_size=1, max_size=8)
_arrays = st.sampled_from([np.float32, np.int64, np.uint8, np.float16]).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
)
_docs = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=10),
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": st.booleans(), "priority": st.integers(0, 3)}),
    "outputs": st.lists(st.fixed_dictionaries({"name": _names}, optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})}), max_size=2),
})
_DATATYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "uint8": "UINT8", "bool": "BOOL"}


def _outcome(fn: Any) -> Any:
    """What decoding gives, comparable: the request's fields, or the error's type."""
    try:
        req = fn()
    except TandemError as e:
        return type(e)
    inputs = {n: (a.dtype.str, a.shape, a.tobytes()) for n, a in req.inputs.items()}
    outputs = [(o.name, o.binary) for o in req.outputs] if req.outputs is not None else None
    return (inputs, req.id, req.parameters, outputs, req.binary_output)


def _body(inputs: dict[str, np.ndarray], json_inputs: dict[str, np.ndarray] | None = None, **doc: Any) -> tuple[bytes, str]:
    entries, blobs = [], []
    for n, a in inputs.items():
        entries.append({"name": n, "shape": list(a.shape), "datatype": _DATATYPES[a.dtype.name], "parameters": {"binary_data_size": a.nbytes}})
        blobs.append(a.tobytes())
    for n, a in (json_inputs or {}).items():
        entries.append({"name": n, "shape": list(a.shape), "datatype": _DATATYPES[a.dtype.name], "data": a.reshape(-1).tolist()})
    header = json.dumps({"inputs": entries, **doc}).encode()
    return header + b"".join(blobs), str(len(header))


def _other_values(inputs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Other values, same names, datatypes and shapes."""
    rng = np.random.default_rng(seed)
    return {n: (rng.random(a.shape) * 100).astype(a.dtype) for n, a in inputs.items()}


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_names, _arrays, min_size=1, max_size=3), _docs, st.integers(0, 2**31))
def test_a_repeated_header_decodes_what_the_full_parser_decodes(inputs: dict[str, np.ndarray], doc: dict[str, Any], seed: int) -> None:
    wire = _V2()
    body, hl = _body(inputs, **doc)
    assert _outcome(lambda: wire._parse(body, hl)) == _outcome(lambda: v2.parse_infer_request(body, hl))
    again, hl2 = _body(_other_values(inputs, seed), **doc)
    assert hl2 == hl and len(wire._plans) == 1
    assert _outcome(lambda: wire._parse(memoryview(again), hl)) == _outcome(lambda: v2.parse_infer_request(again, hl))
    # The same header with a binary part of another length is refused as the full parser refuses it.
    for bad in (again[:-1], again + b"\0"):
        assert _outcome(lambda bad=bad: wire._parse(bad, hl)) == _outcome(lambda bad=bad: v2.parse_infer_request(bad, hl))


def test_json_data_bool_and_bytes_inputs_are_never_planned() -> None:
    wire = _V2()
    x = np.ones((1, 3), np.float32)
    for body, hl in (
        _body({"a": x}, json_inputs={"b": np.array([[1.0, 2.0]], np.float32)}),
        _body({"a": x, "m": np.array([[True, False]])}),
    ):
        assert _outcome(lambda body=body, hl=hl: wire._parse(body, hl)) == _outcome(lambda body=body, hl=hl: v2.parse_infer_request(body, hl))
    assert not wire._plans
    # BOOL bytes other than 0 and 1 are refused the second time too: the header is never trusted for them.
    body, hl = _body({"m": np.array([[True, False]])})
    bad = body[: int(hl)] + b"\x02\x00"
    assert _outcome(lambda: wire._parse(bad, hl)) == _outcome(lambda: v2.parse_infer_request(bad, hl)) == TensorCodecError
    # An empty JSON input is fixed by the header: planning it is sound.
    body, hl = _body({"a": x}, json_inputs={"e": np.zeros((0, 2), np.float32)})
    wire._parse(body, hl)
    assert len(wire._plans) == 1
    assert _outcome(lambda: wire._parse(body, hl)) == _outcome(lambda: v2.parse_infer_request(body, hl))


def test_the_plans_are_bounded_and_a_request_does_not_share_its_lists() -> None:
    wire = _V2()
    for i in range(200):
        body, hl = _body({f"in{i}": np.ones((1, 2), np.float32)}, outputs=[{"name": "o"}])
        wire._parse(body, hl)
    assert 0 < len(wire._plans) <= 64
    first, second = wire._parse(body, hl), wire._parse(body, hl)
    assert first.outputs == second.outputs and first.outputs is not second.outputs
    first.parameters["x"] = 1
    assert "x" not in second.parameters
