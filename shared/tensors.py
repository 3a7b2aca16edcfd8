"""Tensors on the wire: the numpy ↔ Open Inference Protocol datatype table and the msgpack codec.

A tensor travels as a msgpack map ``{"datatype": "FP32", "shape": [2, 64], "data": <bin>}`` where
``data`` is the raw little-endian row-major bytes: no base64, no per-element encoding, and decoding
is a zero-copy ``np.frombuffer`` over the received buffer. ``BYTES`` tensors carry ``data`` as a
msgpack array of bin elements (row-major, flattened).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from .errors import TensorCodecError

# Open Inference Protocol datatype -> numpy dtype (little-endian). BYTES is numpy object of bytes.
DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("O"),
}
_KIND_SIZE_TO_DATATYPE: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPE_TO_DTYPE.items() if name != "BYTES"
}

# ONNX tensor element type names (as onnxruntime reports them, e.g. "tensor(float)") -> datatype.
ONNX_TYPE_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

#: The largest tensor the codec will accept by default (elements), a guard against shapes that lie.
MAX_ELEMENTS = 1 << 31


# The exact (native little-endian) dtypes, looked up first: np.dtype() costs more than the lookup.
_DTYPE_TO_DATATYPE: dict[Any, str] = {dt: name for name, dt in DATATYPE_TO_DTYPE.items() if name != "BYTES"}


def datatype_of(dtype: np.dtype | type) -> str:
    """The Open Inference Protocol datatype for a numpy dtype; raises TensorCodecError if none."""
    try:
        name = _DTYPE_TO_DATATYPE.get(dtype)
    except TypeError:  # unhashable: np.dtype() below says what is wrong with it
        name = None
    if name is not None:
        return name
    dt = np.dtype(dtype)
    if dt.kind in ("O", "S", "U"):
        return "BYTES"
    name = _KIND_SIZE_TO_DATATYPE.get((dt.kind, dt.itemsize))
    if name is None:
        raise TensorCodecError(f"numpy dtype {dt} has no Open Inference Protocol datatype")
    return name


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype for an Open Inference Protocol datatype; raises TensorCodecError if unknown."""
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except (KeyError, TypeError):
        raise TensorCodecError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPE_TO_DTYPE)}"
        ) from None


def check_shape(shape: Any, what: str = "tensor") -> tuple[int, ...]:
    """Validate a wire shape (list of non-negative ints) and return it as a tuple."""
    if not isinstance(shape, (list, tuple)):
        raise TensorCodecError(f"{what}: shape must be a list of integers, got {type(shape).__name__}")
    for d in shape:
        if type(d) is not int or d < 0:  # (not bool either)
            raise TensorCodecError(f"{what}: shape {list(shape)!r} must hold non-negative integers")
    if shape and math.prod(shape) > MAX_ELEMENTS:
        raise TensorCodecError(f"{what}: shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def to_bytes_array(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy object array of ``bytes`` (str elements are UTF-8 encoded)."""
    flat = [v.encode() if isinstance(v, str) else v for v in values]
    if any(not isinstance(v, (bytes, bytearray, memoryview)) for v in flat):
        raise TensorCodecError("BYTES tensor elements must be bytes or str")
    arr = np.empty(len(flat), dtype=object)
    arr[:] = [bytes(v) for v in flat]
    return arr.reshape(shape)


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """numpy array -> wire map. Numeric data is passed as a buffer, not copied into a list."""
    datatype, shape, data = tensor_parts(array)
    return {"datatype": datatype, "shape": shape, "data": data}


def tensor_parts(array: np.ndarray) -> tuple[str, list[int], Any]:
    """(datatype, shape, data) of a numpy array on the wire (:func:`encode_tensor`'s fields)."""
    arr = np.asarray(array)
    datatype = datatype_of(arr.dtype)
    if datatype == "BYTES":
        data: Any = [v.encode() if isinstance(v, str) else bytes(v) for v in arr.reshape(-1)]
    else:
        want = DATATYPE_TO_DTYPE[datatype]
        if arr.dtype != want or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=want)
        data = arr.data.cast("B") if arr.size else b""
    return datatype, list(arr.shape), data


def decode_tensor(obj: Any, what: str = "tensor") -> np.ndarray:
    """Wire map -> numpy array (read-only view over the payload for numeric types)."""
    if type(obj) is not dict and not isinstance(obj, Mapping):  # msgpack gives dicts: skip the ABC check
        raise TensorCodecError(f"{what}: expected a map with datatype, shape, data; got {type(obj).__name__}")
    try:
        datatype, shape, data = obj["datatype"], obj["shape"], obj["data"]
    except KeyError:
        missing = [k for k in ("datatype", "shape", "data") if k not in obj]
        raise TensorCodecError(f"{what}: missing field(s) {', '.join(missing)}") from None
    return tensor_from(datatype, shape, data, what)


def tensor_from(datatype: Any, shape: Any, data: Any, what: str = "tensor") -> np.ndarray:
    """A wire tensor's three fields -> numpy array, each checked (:func:`decode_tensor`'s core)."""
    dtype = dtype_of(datatype)
    shape = check_shape(shape, what)
    count = math.prod(shape)
    if dtype.kind == "O":
        if not isinstance(data, (list, tuple)):
            raise TensorCodecError(f"{what}: BYTES data must be an array of bin elements")
        if len(data) != count:
            raise TensorCodecError(f"{what}: shape {list(shape)} needs {count} elements, got {len(data)}")
        return to_bytes_array(data, shape)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TensorCodecError(f"{what}: data must be raw bytes, got {type(data).__name__}")
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise TensorCodecError(
            f"{what}: shape {list(shape)} of {datatype} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype, count).reshape(shape)


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: encode_tensor(arr) for name, arr in tensors.items()}


def decode_tensors(obj: Any, what: str = "inputs") -> dict[str, np.ndarray]:
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise TensorCodecError(f"{what}: expected a map of name -> tensor, got {type(obj).__name__}")
    out = {}
    for name, t in obj.items():
        if not isinstance(name, str):
            raise TensorCodecError(f"{what}: tensor names must be strings, got {name!r}")
        out[name] = decode_tensor(t, f"{what}[{name!r}]")
    return out


_local = threading.local()


def packb(obj: Any) -> bytes:
    """msgpack-encode (memoryviews go out as bin without a copy into a Python bytes first)."""
    # One Packer per thread, reused: msgpack.packb builds a new one per call (~0.25 us more).
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


def unpackb(data: bytes | bytearray | memoryview, max_bytes: int | None = None) -> Any:
    """msgpack-decode untrusted bytes; any malformation becomes a TensorCodecError."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TensorCodecError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises many kinds on garbage (ExtraData, ValueError, UnicodeDecodeError...)
        raise TensorCodecError(f"malformed msgpack payload: {type(e).__name__}: {e}") from None
