"""The native msgpack protocol spoken between Tandem's edge and cloud (and the agent's local API).

``POST /v1/models/{model}/infer`` (or ``/v1/models/{model}/versions/{version}/infer``), body
``application/msgpack``::

    request  = {"id"?: str, "inputs": {name: tensor}, "outputs"?: [name], "deadline_ms"?: float,
                "priority"?: int, "parameters"?: {str: scalar}}
    response = {"id": str, "model_name": str, "model_version": str, "outputs": {name: tensor}}
    error    = {"error": str, "code": str}          (with a 4xx/5xx status)

Tensors use :mod:`tandem.shared.tensors`. Every response, in both protocols, carries the server's
timing in the ``X-Tandem-*`` headers below so the router can learn the cloud's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import numpy as np

from .errors import InvalidInput, TandemError, TensorCodecError, error_from_body
from .tensors import packb, tensor_from, tensor_parts, unpackb

_T = TypeVar("_T")

CONTENT_TYPE = "application/msgpack"
NATIVE_PREFIX = "/v1"

# Request headers.
HEADER_REQUEST_ID = "X-Request-Id"
HEADER_DEADLINE_MS = "X-Tandem-Deadline-Ms"  # remaining milliseconds, as sent by the caller
HEADER_PRIORITY = "X-Tandem-Priority"
# Response headers (server timing), microseconds unless named otherwise.
HEADER_QUEUE_US = "X-Tandem-Queue-Us"
HEADER_COMPUTE_US = "X-Tandem-Compute-Us"
HEADER_BATCH_SIZE = "X-Tandem-Batch-Size"
HEADER_QUEUE_DEPTH = "X-Tandem-Queue-Depth"
HEADER_MODEL_VERSION = "X-Tandem-Model-Version"
HEADER_COST = "X-Tandem-Cost"  # price of this call as advertised by the server, in the caller's unit
HEADER_RETRY_AFTER = "Retry-After"


def infer_path(model: str, version: str | None = None) -> str:
    if version:
        return f"{NATIVE_PREFIX}/models/{model}/versions/{version}/infer"
    return f"{NATIVE_PREFIX}/models/{model}/infer"


class _Tensor(msgspec.Struct, gc=False):
    datatype: str
    shape: list[int]
    data: memoryview | list[bytes]  # numeric: a view of the body's bytes; BYTES: its elements


class _Request(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """The request map: the fields' types are checked by msgspec as it decodes."""

    inputs: dict[str, _Tensor]
    id: str | None = None
    outputs: list[str] | None = None
    deadline_ms: float | None = None
    priority: int = 0
    parameters: dict[str, Any] | None = None


class _Response(msgspec.Struct, omit_defaults=True, gc=False):
    model_name: str
    model_version: str
    outputs: dict[str, _Tensor]
    id: str | None = None


_REQUESTS, _RESPONSES = msgspec.msgpack.Decoder(_Request), msgspec.msgpack.Decoder(_Response)
_ENCODER = msgspec.msgpack.Encoder()


def _decode(body: bytes | bytearray | memoryview, decoder: msgspec.msgpack.Decoder[_T], max_bytes: int | None = None) -> _T:
    """``body`` decoded by ``decoder``; any malformation becomes an InvalidInput (or TensorCodecError) naming it."""
    if max_bytes is not None and len(body) > max_bytes:
        raise TensorCodecError(f"payload of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        try:
            return decoder.decode(body)
        except msgspec.ValidationError as e:
            msgspec.msgpack.decode(body)  # malformed msgpack (a truncated array, say) is told as such
            text = str(e)
    except (msgspec.DecodeError, RecursionError) as e:
        raise TensorCodecError(f"malformed msgpack payload: {e}") from None
    top = " - at " not in text
    if top and text.startswith("Expected `object`"):
        raise InvalidInput(f"{'request' if decoder is _REQUESTS else 'response'} body must be a msgpack map")
    if top and text.startswith("Object contains unknown field"):
        raise InvalidInput(f"unknown request field(s): {text.split('`')[1]}")
    if top and text.startswith("Object missing required field"):
        raise InvalidInput(f"{'request' if decoder is _REQUESTS else 'response'} has no {text.split('`')[1]!r}")
    raise (TensorCodecError if "$.inputs" in text else InvalidInput)(text)


def _arrays(tensors: dict[str, _Tensor], what: str) -> dict[str, np.ndarray]:
    """numpy arrays of decoded tensors (views over the body for numeric ones), each checked."""
    return {name: tensor_from(t.datatype, t.shape, t.data, f"{what}[{name!r}]") for name, t in tensors.items()}


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, _Tensor]:
    return {name: _Tensor(*tensor_parts(arr)) for name, arr in arrays.items()}


@dataclass(slots=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None
    deadline_ms: float | None = None
    priority: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> bytes:
        deadline = float(self.deadline_ms) if self.deadline_ms is not None else None
        outputs = list(self.outputs) if self.outputs is not None else None
        msg = _Request(_tensors(self.inputs), self.id, outputs, deadline, int(self.priority), self.parameters or None)
        return _ENCODER.encode(msg)

    @classmethod
    def from_wire(cls, body: bytes | bytearray | memoryview, max_bytes: int | None = None) -> InferRequest:
        msg = _decode(body, _REQUESTS, max_bytes)
        return cls(_arrays(msg.inputs, "inputs"), msg.id, msg.outputs, msg.deadline_ms, msg.priority, msg.parameters or {})


@dataclass(slots=True)
class InferResponse:
    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    id: str | None = None

    def to_wire(self) -> bytes:
        return _ENCODER.encode(_Response(self.model_name, self.model_version, _tensors(self.outputs), self.id))

    @classmethod
    def from_wire(cls, body: bytes | bytearray | memoryview) -> InferResponse:
        msg = _decode(body, _RESPONSES)
        return cls(_arrays(msg.outputs, "outputs"), msg.model_name, msg.model_version, msg.id)


@dataclass(slots=True, frozen=True)
class ServerTiming:
    """What the server tells the router about one call (parsed from the X-Tandem-* headers)."""

    queue_us: float | None = None
    compute_us: float | None = None
    batch_size: int | None = None
    queue_depth: int | None = None
    cost: float | None = None

    def to_headers(self) -> dict[str, str]:
        h = {}
        if self.queue_us is not None:
            h[HEADER_QUEUE_US] = f"{self.queue_us:.0f}"
        if self.compute_us is not None:
            h[HEADER_COMPUTE_US] = f"{self.compute_us:.0f}"
        if self.batch_size is not None:
            h[HEADER_BATCH_SIZE] = str(self.batch_size)
        if self.queue_depth is not None:
            h[HEADER_QUEUE_DEPTH] = str(self.queue_depth)
        if self.cost is not None:
            h[HEADER_COST] = repr(self.cost)
        return h

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ServerTiming:
        def num(name: str, conv: Any) -> Any:
            v = headers.get(name)
            if v is None:
                return None
            try:
                return conv(v)
            except ValueError:
                return None

        return cls(
            queue_us=num(HEADER_QUEUE_US, float),
            compute_us=num(HEADER_COMPUTE_US, float),
            batch_size=num(HEADER_BATCH_SIZE, int),
            queue_depth=num(HEADER_QUEUE_DEPTH, int),
            cost=num(HEADER_COST, float),
        )


def error_body(message: str, code: str) -> bytes:
    return packb({"error": message, "code": code})


def error_from_reply(status: int, raw: bytes) -> TandemError:
    """The exception an error reply stands for, whichever protocol's body it carries: the native
    protocol's msgpack ``{"error", "code"}``, or JSON (v2, the job API); else one from the status."""
    body: Any = None
    try:
        body = unpackb(raw)
    except TandemError:
        body = None
    if not isinstance(body, dict):
        import json

        try:
            body = json.loads(raw)
        except ValueError:
            body = None
    return error_from_body(status, body)
