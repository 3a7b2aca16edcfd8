"""Byte layouts of infer messages: decode and encode the common case without parsing it again.

Why: a small model is served at ~15k requests/s on two cores, and every microsecond the event loop
spends per request is ~0.5% of that. A client sends the same message call after call: the same
fields, the same input names, datatypes and shapes, only the tensor bytes (and its request id and
deadline) changing. Parsing and validating that map again each time cost ~2.5 us a request, and
encoding the response ~1.8 us; matching the bytes against the previous message's layout costs
well under half of that.

* :class:`RequestDecoder` remembers the layouts of recent requests it decoded in full: the bytes
  around the *holes* (each numeric input's payload, the ``id`` string, a float64 ``deadline_ms``).
  A body that has the same bytes everywhere else has, by construction, the same msgpack structure
  (the holes' lengths are fixed by headers outside them, or parsed), so its tensors are views at
  the same offsets. Anything else takes the full :meth:`InferRequest.from_wire` path, which
  validates and raises the usual errors: the fast path never accepts what the full one refuses.
* :class:`ResponseEncoder` builds the response's bytes around each output's payload from a cached
  prefix per (model, version, output names/datatypes/shapes): the same bytes
  :meth:`InferResponse.to_wire` produces.

* :class:`V2RequestDecoder` and :class:`V2ResponseEncoder` do the same for the Open Inference
  Protocol's binary tensor extension: a request whose JSON header is byte for byte one decoded
  before (what tritonclient sends call after call) is the same request with new tensor bytes, and
  a response's JSON header depends only on the outputs' names, datatypes and shapes (and the id).
  Requests with JSON tensor data, BOOL or BYTES inputs always take the full path.

None is thread-safe: use one per event loop. Only the server uses them (the wire contract itself,
and every client, is tandem.shared.protocol / tandem.shared.v2). They earn their keep: with the
plain codecs in their place, bench/loop_cost.py measured ~26.6 against ~19-22 us of loop CPU per
request on the digits model.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack
import numpy as np

from tandem.shared import v2
from tandem.shared.protocol import InferRequest, InferResponse
from tandem.shared.tensors import DATATYPE_TO_DTYPE, datatype_of, packb

__all__ = ["RequestDecoder", "ResponseEncoder", "V2RequestDecoder", "V2ResponseEncoder"]

#: Bodies larger than this are always decoded in full: their parsing is small beside their copying.
MAX_LAYOUT_BYTES = 64 * 1024
#: Layouts remembered, newest first.
MAX_LAYOUTS = 4
#: After a miss, the next misses build no layout until this many went by: a client whose every
#: request is laid out differently must not pay for building layouts that never match.
_BUILD_EVERY = 16

_TENSOR, _ID, _DEADLINE = 0, 1, 2
_FLOAT64 = struct.Struct(">d")


class _Layout:
    """A request's bytes cut at its holes: ``segments[i]`` precedes ``holes[i]``; the last segment
    ends the body."""

    __slots__ = ("segments", "holes", "outputs", "priority", "parameters", "deadline_ms", "id")

    def __init__(self, segments: list[bytes], holes: list[tuple[Any, ...]], req: InferRequest) -> None:
        self.segments = segments
        self.holes = holes
        self.outputs = req.outputs
        self.priority = req.priority
        self.parameters = req.parameters
        self.deadline_ms = req.deadline_ms  # when the deadline is not a hole (absent)
        self.id = req.id

    def match(self, body: bytes) -> InferRequest | None:
        segments = self.segments
        if not body.startswith(segments[0]):
            return None
        pos = len(segments[0])
        inputs: dict[str, np.ndarray] = {}
        rid, deadline = self.id, self.deadline_ms
        i = 1
        for hole in self.holes:
            kind = hole[0]
            if kind == _TENSOR:
                _, name, dtype, count, shape, nbytes = hole
                if pos + nbytes > len(body):
                    return None
                inputs[name] = np.frombuffer(body, dtype, count, pos).reshape(shape)
                pos += nbytes
            elif kind == _ID:
                rid, pos = _read_str(body, pos)
                if rid is None:
                    return None
            else:
                if body[pos : pos + 1] != b"\xcb" or pos + 9 > len(body):
                    return None
                deadline = _FLOAT64.unpack_from(body, pos + 1)[0]
                pos += 9
            segment = segments[i]
            if not body.startswith(segment, pos):
                return None
            pos += len(segment)
            i += 1
        if pos != len(body):
            return None
        outputs = self.outputs
        return InferRequest(
            inputs, rid, list(outputs) if outputs is not None else None, deadline, self.priority,
            dict(self.parameters) if self.parameters else {},
        )


def _read_str(body: bytes, pos: int) -> tuple[str | None, int]:
    """A msgpack str at ``pos``: (value, offset past it); (None, pos) if it is not one."""
    if pos >= len(body):
        return None, pos
    b = body[pos]
    if 0xA0 <= b <= 0xBF:
        n, start = b & 0x1F, pos + 1
    elif b == 0xD9 and pos + 2 <= len(body):
        n, start = body[pos + 1], pos + 2
    elif b == 0xDA and pos + 3 <= len(body):
        n, start = int.from_bytes(body[pos + 1 : pos + 3], "big"), pos + 3
    else:
        return None, pos
    if start + n > len(body):
        return None, pos
    try:
        return body[start : start + n].decode(), start + n
    except UnicodeDecodeError:
        return None, pos


class _RepeatedKey(Exception):
    pass


def _unique_keys(u: msgpack.Unpacker) -> Iterator[Any]:
    """The keys of the map at the unpacker's position (the caller reads or skips each value before
    asking for the next key); raises _RepeatedKey on a key seen twice."""
    seen: set[Any] = set()
    for _ in range(u.read_map_header()):
        key = u.unpack()
        if key in seen:
            raise _RepeatedKey
        seen.add(key)
        yield key


def _build(body: bytes, req: InferRequest) -> _Layout | None:
    """The layout of ``body`` (which ``req`` was decoded from), or None when it has none worth
    keeping (a BYTES tensor, a repeated key, a deadline that is not a float64)."""
    u = msgpack.Unpacker(raw=False, strict_map_key=False)
    u.feed(body)
    cuts: list[tuple[int, int, tuple[Any, ...]]] = []  # (start, end, hole) in body order
    try:
        for key in _unique_keys(u):
            start = u.tell()
            if key == "inputs":
                for name in _unique_keys(u):
                    for field in _unique_keys(u):
                        if field != "data":
                            u.skip()
                            continue
                        value = u.unpack()
                        end = u.tell()
                        if type(value) is not bytes:
                            return None  # BYTES tensors (lists) are decoded in full
                        arr = req.inputs[name]
                        cuts.append((end - len(value), end, (_TENSOR, name, arr.dtype, arr.size, arr.shape, len(value))))
            elif key in ("id", "deadline_ms"):
                u.skip()
                if key == "deadline_ms" and body[start] != 0xCB:
                    return None
                cuts.append((start, u.tell(), (_ID,) if key == "id" else (_DEADLINE,)))
            else:
                u.skip()
    except _RepeatedKey:
        return None  # msgpack lets a map repeat a key (the last wins): left to the full decoder
    if u.tell() != len(body):
        return None
    segments, holes, pos = [], [], 0
    for start, end, hole in cuts:
        segments.append(body[pos:start])
        holes.append(hole)
        pos = end
    segments.append(body[pos:])
    return _Layout(segments, holes, req)


class RequestDecoder:
    """Decodes native infer requests (:meth:`InferRequest.from_wire`), fast for repeated layouts."""

    def __init__(self) -> None:
        self._layouts: list[_Layout] = []
        self._misses = 0

    def decode(self, body: bytes | bytearray | memoryview) -> InferRequest:
        """The request in ``body``; raises what :meth:`InferRequest.from_wire` raises."""
        small = len(body) <= MAX_LAYOUT_BYTES
        if small:
            if type(body) is not bytes:
                body = bytes(body)  # a few hundred bytes: cheaper than slicing a view per segment
            for layout in self._layouts:
                try:
                    req = layout.match(body)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - never expected; the full path then answers
                    req = None
                if req is not None:
                    return req
        req = InferRequest.from_wire(body)
        if small:
            if self._misses % _BUILD_EVERY == 0:
                try:
                    built = _build(body, req)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - never expected (the body just decoded); no layout then
                    built = None
                if built is not None:
                    self._layouts = [built, *self._layouts[: MAX_LAYOUTS - 1]]
            self._misses += 1
        return req


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


_ID_KEY = packb("id")
#: Numeric dtypes the encoder copies as they are (BYTES and non-native dtypes take the full path).
_NUMERIC = frozenset(dt for name, dt in DATATYPE_TO_DTYPE.items() if name != "BYTES")


class ResponseEncoder:
    """Encodes native infer responses: the bytes of :meth:`InferResponse.to_wire`, faster."""

    def __init__(self, max_layouts: int = 256) -> None:
        self._prefixes: dict[tuple[Any, ...], list[bytes]] = {}
        self._max = max_layouts

    def encode(self, outputs: Mapping[str, np.ndarray], model_name: str, model_version: str, id: str | None) -> bytes:
        parts: list[Any] = []
        key: list[Any] = [model_name, model_version]
        for name, arr in outputs.items():
            if type(arr) is not np.ndarray or arr.dtype not in _NUMERIC or not arr.flags.c_contiguous:
                return InferResponse(dict(outputs), model_name, model_version, id=id).to_wire()
            key.append((name, arr.dtype, arr.shape))
            parts.append(arr)
        k = tuple(key)
        prefixes = self._prefixes.get(k)
        if prefixes is None:
            if len(self._prefixes) >= self._max:
                self._prefixes.clear()
            prefixes = self._prefixes[k] = _prefixes(outputs, model_name, model_version)
        pieces: list[Any] = [b"\x84" if id is not None else b"\x83"]  # the response map's entry count
        for prefix, arr in zip(prefixes, parts):
            pieces.append(prefix)
            pieces.append(arr)  # numpy arrays are buffers: join copies them once
        pieces.append(prefixes[-1])
        if id is not None:
            pieces.append(_ID_KEY)
            pieces.append(packb(id))
        return b"".join(pieces)


def _prefixes(outputs: Mapping[str, np.ndarray], model_name: str, model_version: str) -> list[bytes]:
    """The bytes before each output's payload, then what follows the last one. The response map's
    header (its entry count depends on the ``id``) and the ``id`` are :meth:`ResponseEncoder.encode`'s."""
    # Same key order as InferResponse.to_wire and encode_tensor, so the bytes are the same.
    head = {"model_name": model_name, "model_version": model_version}
    pieces: list[bytes] = []
    current = b"".join(packb(k) + packb(v) for k, v in head.items()) + packb("outputs") + _map_header(len(outputs))
    for name, arr in outputs.items():
        current += packb(name) + _map_header(3) + packb("datatype") + packb(datatype_of(arr.dtype))
        current += packb("shape") + packb(list(arr.shape)) + packb("data") + _bin_header(arr.nbytes)
        pieces.append(current)
        current = b""
    pieces.append(current)
    return pieces


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


# --- Open Inference Protocol v2, binary tensors ---------------------------------------------------

#: JSON headers longer than this are always parsed (and never kept).
MAX_V2_HEADER_BYTES = 4096


class _V2Plan:
    """What a v2 JSON header says, for a body whose binary part is only tensor payloads."""

    __slots__ = ("tensors", "binary_bytes", "id", "parameters", "outputs", "binary_output")

    def __init__(self, req: v2.V2Request) -> None:
        self.tensors = [(name, a.dtype, a.size, a.shape, a.nbytes) for name, a in req.inputs.items()]
        self.binary_bytes = sum(t[4] for t in self.tensors)
        self.id = req.id
        self.parameters = req.parameters
        self.outputs = req.outputs
        self.binary_output = req.binary_output

    def request(self, body: bytes | bytearray | memoryview, offset: int) -> v2.V2Request:
        inputs = {}
        for name, dtype, count, shape, nbytes in self.tensors:
            inputs[name] = np.frombuffer(body, dtype, count, offset).reshape(shape)
            offset += nbytes
        outputs = self.outputs
        return v2.V2Request(
            inputs, self.id, dict(self.parameters),
            list(outputs) if outputs is not None else None, self.binary_output,  # V2Output is frozen: shared
        )


class V2RequestDecoder:
    """Decodes v2 infer requests (:func:`v2.parse_infer_request`), fast for a repeated binary header."""

    def __init__(self, max_headers: int = 64) -> None:
        self._plans: dict[bytes, _V2Plan] = {}
        self._max = max_headers

    def decode(self, body: bytes | bytearray | memoryview, header_length: str | int | None) -> v2.V2Request:
        """The request in ``body``; raises what :func:`v2.parse_infer_request` raises."""
        header = None
        if header_length is not None:
            try:
                hl = int(header_length)
            except (TypeError, ValueError):
                hl = -1  # the full parse says what is wrong
            if 0 < hl <= MAX_V2_HEADER_BYTES and hl <= len(body):
                header = bytes(body[:hl])
                plan = self._plans.get(header)
                if plan is not None and len(body) - hl == plan.binary_bytes:
                    try:
                        return plan.request(body, hl)
                    except Exception:  # noqa: BLE001 - never expected; the full parse then answers
                        pass
        req = v2.parse_infer_request(body, header_length)
        if header is not None and all(a.dtype.kind not in "Ob" for a in req.inputs.values()) and _all_binary(req, len(body) - len(header)):
            if len(self._plans) >= self._max:
                self._plans.clear()
            self._plans[header] = _V2Plan(req)
        return req


def _all_binary(req: v2.V2Request, binary_bytes: int) -> bool:
    """Whether the binary part holds every input's bytes. An input with JSON ``data`` adds none, so
    equality means each such input is empty: then the header alone fixes it, as the plan assumes."""
    return sum(a.nbytes for a in req.inputs.values()) == binary_bytes


class V2ResponseEncoder:
    """Encodes v2 infer responses (:func:`v2.encode_infer_response`), with each binary-output JSON
    header built once per layout."""

    def __init__(self, max_layouts: int = 256) -> None:
        self._headers: dict[tuple[Any, ...], bytes] = {}
        self._max = max_layouts

    def encode(
        self, model_name: str, model_version: str | None, outputs: Mapping[str, np.ndarray], request: v2.V2Request
    ) -> tuple[bytes, dict[str, str]]:
        """(body, headers) as :func:`v2.encode_infer_response` returns them with ``request``."""
        chosen = v2.chosen_outputs(request, outputs)
        key: list[Any] = [model_name, model_version, request.id]
        blobs: list[Any] = []
        for name, binary in chosen:
            arr = outputs.get(name)
            if not binary or type(arr) is not np.ndarray or arr.dtype not in _NUMERIC or not arr.flags.c_contiguous:
                return v2.encode_infer_response(model_name, model_version, outputs, request=request, id=request.id)
            key.append((name, arr.dtype, arr.shape))
            blobs.append(arr)
        if not blobs:  # no output asked for: a JSON body, nothing to cache
            return v2.encode_infer_response(model_name, model_version, outputs, request=request, id=request.id)
        k = tuple(key)
        header = self._headers.get(k)
        if header is None:
            body, headers = v2.encode_infer_response(model_name, model_version, outputs, request=request, id=request.id)
            if len(self._headers) >= self._max:
                self._headers.clear()
            self._headers[k] = body[: int(headers[v2.HEADER_LENGTH])]
            return body, headers
        return b"".join([header, *blobs]), {"Content-Type": v2.BINARY_CONTENT_TYPE, v2.HEADER_LENGTH: str(len(header))}
