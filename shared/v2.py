"""Open Inference Protocol v2 (KServe / Triton REST): the JSON and binary-tensor codec.

Pure functions over bytes and numpy arrays, no HTTP library: the cloud server and the edge agent's
local API both use them.

Public API::

    parse_infer_request(body, header_length=None) -> V2Request
        body: the (already decompressed) request body. header_length: the value of the
        ``Inference-Header-Content-Length`` header (None when absent: the body is all JSON). Binary
        inputs carry ``parameters.binary_data_size`` and are sliced, in JSON order, from the bytes
        after the header; JSON inputs carry ``data`` (flat or nested, row-major). Raises
        InvalidInput / TensorCodecError naming the problem; never anything else.

    encode_infer_response(model_name, model_version, outputs, *, request=None, id=None,
                          parameters=None) -> tuple[bytes, dict[str, str]]
        outputs: name -> ndarray (all the model produced). ``request`` (a V2Request) selects the
        outputs asked for and whether each goes binary (``parameters.binary_data`` per output, or
        request-level ``parameters.binary_data_output``). Returns the body and the headers to send
        (``Content-Type``, and ``Inference-Header-Content-Length`` when any output is binary).

Wire facts: binary data is little-endian, row-major; BOOL is one byte per element; BYTES elements
are a 4-byte little-endian length followed by the bytes. A request that names no outputs gets all
of them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np

from .errors import InvalidInput, TensorCodecError
from .tensors import check_shape, datatype_of, dtype_of, tensor_parts, to_bytes_array

__all__ = [
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "BINARY_CONTENT_TYPE",
    "V2Output",
    "V2Request",
    "parse_infer_request",
    "encode_infer_response",
    "encode_bytes_tensor",
    "decode_bytes_tensor",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# numpy kinds a JSON array may hold for each datatype family (ints are fine for floats, not back).
_JSON_KINDS: dict[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS: dict[str, str] = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}


@dataclass(slots=True, frozen=True)
class V2Output:
    name: str
    binary: bool | None = None  # None: follow the request-level default


@dataclass(slots=True)
class V2Request:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[V2Output] | None = None
    #: request-level ``binary_data_output``
    binary_output: bool = False

    def priority(self) -> int:
        """The ``priority`` request parameter (0 = default)."""
        p = self.parameters.get("priority", 0)
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise InvalidInput(f"parameter 'priority' must be a non-negative integer, got {_short(p)}")
        return p

    def timeout_us(self) -> float | None:
        """The ``timeout`` request parameter in microseconds (None = none given)."""
        t = self.parameters.get("timeout")
        if t is None:
            return None
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise InvalidInput(f"parameter 'timeout' must be a non-negative number of microseconds, got {_short(t)}")
        try:
            return float(t)
        except OverflowError:  # an int beyond any float: no deadline worth keeping
            return math.inf


def _short(value: Any) -> str:
    """A value for an error message, cut to a readable length (a request may send megabytes)."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 1000 else f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 80 else text[:77] + "..."


class _InputParameters(msgspec.Struct, gc=False):
    binary_data_size: Annotated[int, msgspec.Meta(ge=0)] | None = None


class _Input(msgspec.Struct, gc=False):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    shape: list[int]
    datatype: str
    data: Any = msgspec.UNSET
    parameters: _InputParameters | None = None


class _OutputParameters(msgspec.Struct, gc=False):
    binary_data: bool | None = None
    classification: Any = None


class _Output(msgspec.Struct, gc=False):
    name: str
    parameters: _OutputParameters | None = None


class _Header(msgspec.Struct, gc=False):
    """The JSON header of a request: the fields' types are checked by msgspec as it decodes."""

    inputs: list[_Input] = []
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[_Output] | None = None


def _json_header(raw: bytes | memoryview) -> _Header:
    try:
        return msgspec.json.decode(raw, type=_Header)
    except msgspec.ValidationError as e:
        text = str(e)
        raise InvalidInput("request must be a JSON object" if text.startswith("Expected `object`") and " - at " not in text
                           else f"invalid request header JSON: {text}") from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise InvalidInput(f"request header is not valid JSON: {e}") from None


def parse_infer_request(body: bytes | bytearray | memoryview, header_length: int | str | None = None) -> V2Request:
    """Decode a v2 infer request (JSON, or JSON header + binary tensors). See the module docstring."""
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[:0]
    else:
        try:
            hl = int(header_length)
        except (TypeError, ValueError):
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if hl < 0 or hl > len(view):
            raise InvalidInput(f"{HEADER_LENGTH} is {hl} but the body has {len(view)} bytes")
        header, binary = view[:hl], view[hl:]
    doc = _json_header(header)
    if not doc.inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for t in doc.inputs:
        name = t.name
        what = f"input {name!r}"
        if name in inputs:
            raise InvalidInput(f"{what} is given twice")
        shape = check_shape(t.shape, what)
        dtype = dtype_of(t.datatype)
        count = math.prod(shape)  # at most MAX_ELEMENTS: check_shape saw to that
        size = t.parameters.binary_data_size if t.parameters is not None else None
        if size is not None:
            if t.data is not msgspec.UNSET:
                raise InvalidInput(f"{what}: has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{what}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} binary bytes left)"
                )
            chunk = binary[offset : offset + size]
            offset += size
            inputs[name] = _from_binary(chunk, dtype, t.datatype, shape, count, what)
        else:
            if t.data is msgspec.UNSET:
                raise InvalidInput(f"{what}: no 'data' and no binary_data_size")
            inputs[name] = _from_json(t.data, dtype, t.datatype, shape, count, what)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} binary bytes after the last tensor are not claimed by any input")

    params = doc.parameters or {}
    bin_out = params.get("binary_data_output", False)
    if not isinstance(bin_out, bool):
        raise InvalidInput("parameter 'binary_data_output' must be a boolean")
    outputs = None
    if doc.outputs is not None:
        outputs = []
        for o in doc.outputs:
            oparams = o.parameters or _OutputParameters()
            if oparams.classification:
                raise InvalidInput(f"output {o.name!r}: the classification extension is not supported")
            outputs.append(V2Output(o.name, oparams.binary_data))
    return V2Request(inputs=inputs, id=doc.id, parameters=params, outputs=outputs, binary_output=bin_out)


def _from_binary(
    chunk: memoryview, dtype: np.dtype, datatype: str, shape: tuple[int, ...], count: int, what: str
) -> np.ndarray:
    if dtype.kind == "O":
        return decode_bytes_tensor(chunk, shape, count, what)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise TensorCodecError(f"{what}: shape {list(shape)} of {datatype} needs {expected} bytes, got {len(chunk)}")
    arr = np.frombuffer(chunk, dtype=dtype, count=count).reshape(shape)
    if dtype.kind == "b" and count and (arr.view(np.uint8) > 1).any():
        raise TensorCodecError(f"{what}: BOOL bytes must be 0 or 1")
    return arr


def _from_json(data: Any, dtype: np.dtype, datatype: str, shape: tuple[int, ...], count: int, what: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if dtype.kind == "O":
        flat = _flatten(data, what)
        if len(flat) != count:
            raise TensorCodecError(f"{what}: shape {list(shape)} needs {count} elements, got {len(flat)}")
        if any(not isinstance(v, str) for v in flat):
            raise TensorCodecError(f"{what}: BYTES data must be strings")
        return to_bytes_array(flat, shape)
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise TensorCodecError(f"{what}: 'data' must be a (nested) list of numbers of one shape") from None
    if arr.size != count:
        raise TensorCodecError(f"{what}: shape {list(shape)} needs {count} elements, got {arr.size}")
    allowed = _JSON_KINDS[dtype.kind]
    if count and arr.dtype.kind not in allowed:
        raise TensorCodecError(f"{what}: {datatype} data must hold {_KIND_WORDS[dtype.kind]}, got {arr.dtype.kind!r} values")
    try:
        with np.errstate(over="raise", invalid="raise"):
            out = arr.astype(dtype) if count else np.zeros(0, dtype)
    except (OverflowError, FloatingPointError, ValueError):
        raise TensorCodecError(f"{what}: values do not fit {datatype}") from None
    if dtype.kind in "iu" and count and not np.array_equal(out, arr):
        raise TensorCodecError(f"{what}: values do not fit {datatype}")
    return out.reshape(shape)


def _flatten(data: list[Any], what: str, depth: int = 0) -> list[Any]:
    if depth > 32:
        raise TensorCodecError(f"{what}: 'data' is nested too deeply")
    out: list[Any] = []
    for v in data:
        if isinstance(v, list):
            out.extend(_flatten(v, what, depth + 1))
        else:
            out.append(v)
    return out


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    """BYTES tensor -> binary form (4-byte LE length + bytes per element, row-major)."""
    parts = []
    for v in np.asarray(arr, dtype=object).reshape(-1):
        b = v.encode() if isinstance(v, str) else bytes(v)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_bytes_tensor(chunk: bytes | memoryview, shape: tuple[int, ...], count: int, what: str = "tensor") -> np.ndarray:
    """Binary BYTES tensor -> numpy object array of bytes, checking every length prefix."""
    view = memoryview(chunk)
    items: list[bytes] = []
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise TensorCodecError(f"{what}: truncated BYTES element length at byte {pos}")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise TensorCodecError(f"{what}: BYTES element of {n} bytes runs past the tensor data")
        items.append(bytes(view[pos : pos + n]))
        pos += n
        if len(items) > count:
            break
    if len(items) != count:
        raise TensorCodecError(f"{what}: shape {list(shape)} needs {count} BYTES elements, got {len(items)}")
    return to_bytes_array(items, shape)


def _to_json_data(arr: np.ndarray) -> list[Any]:
    if arr.dtype.kind in "OSU":
        return [v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    outputs: Mapping[str, np.ndarray],
    *,
    request: V2Request | None = None,
    id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode a v2 infer response; see the module docstring."""
    default = request.binary_output if request is not None else False
    if request is not None and request.outputs is not None:
        chosen = [(o.name, default if o.binary is None else o.binary) for o in request.outputs]
    else:
        chosen = [(name, default) for name in outputs]
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    rid = id if id is not None else (request.id if request is not None else None)
    if rid is not None:
        doc["id"] = rid
    if parameters:
        doc["parameters"] = dict(parameters)
    entries = []
    blobs: list[bytes | memoryview] = []
    for name, binary in chosen:
        arr = np.asarray(outputs[name])
        datatype = datatype_of(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = encode_bytes_tensor(arr) if datatype == "BYTES" else tensor_parts(arr)[2]
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json_data(arr)
        entries.append(entry)
    doc["outputs"] = entries
    header = msgspec.json.encode(doc)
    if not blobs:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    body = b"".join([header, *blobs])
    return body, {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}
