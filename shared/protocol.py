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
from typing import Any

import numpy as np

from .errors import InvalidInput, TandemError, error_from_body
from .tensors import decode_tensors, encode_tensors, packb, unpackb

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


_REQUEST_FIELDS = frozenset({"id", "inputs", "outputs", "deadline_ms", "priority", "parameters"})


@dataclass(slots=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None
    deadline_ms: float | None = None
    priority: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> bytes:
        msg: dict[str, Any] = {"inputs": encode_tensors(self.inputs)}
        if self.id is not None:
            msg["id"] = self.id
        if self.outputs is not None:
            msg["outputs"] = list(self.outputs)
        if self.deadline_ms is not None:
            msg["deadline_ms"] = float(self.deadline_ms)
        if self.priority:
            msg["priority"] = int(self.priority)
        if self.parameters:
            msg["parameters"] = self.parameters
        return packb(msg)

    @classmethod
    def from_wire(cls, body: bytes | bytearray | memoryview, max_bytes: int | None = None) -> InferRequest:
        msg = unpackb(body, max_bytes)
        if type(msg) is not dict:  # unpackb gives dicts for msgpack maps
            raise InvalidInput("request body must be a msgpack map")
        if not msg.keys() <= _REQUEST_FIELDS:
            unknown = msg.keys() - _REQUEST_FIELDS
            raise InvalidInput(f"unknown request field(s): {', '.join(sorted(map(str, unknown)))}")
        if "inputs" not in msg:
            raise InvalidInput("request has no 'inputs'")
        rid = msg.get("id")
        if rid is not None and not isinstance(rid, str):
            raise InvalidInput("'id' must be a string")
        outputs = msg.get("outputs")
        if outputs is not None and (
            not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)
        ):
            raise InvalidInput("'outputs' must be a list of output names")
        deadline = msg.get("deadline_ms")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
            raise InvalidInput("'deadline_ms' must be a number of milliseconds")
        priority = msg.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidInput("'priority' must be an integer")
        params = msg.get("parameters") or {}
        if type(params) is not dict:
            raise InvalidInput("'parameters' must be a map")
        # params is a fresh dict from unpackb: kept as it is, not copied.
        return cls(decode_tensors(msg["inputs"]), rid, outputs, float(deadline) if deadline is not None else None, priority, params)


@dataclass(slots=True)
class InferResponse:
    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    id: str | None = None

    def to_wire(self) -> bytes:
        msg: dict[str, Any] = {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "outputs": encode_tensors(self.outputs),
        }
        if self.id is not None:
            msg["id"] = self.id
        return packb(msg)

    @classmethod
    def from_wire(cls, body: bytes | bytearray | memoryview) -> InferResponse:
        msg = unpackb(body)
        if not isinstance(msg, Mapping) or "outputs" not in msg:
            raise InvalidInput("response body must be a msgpack map with 'outputs'")
        return cls(
            outputs=decode_tensors(msg["outputs"], "outputs"),
            model_name=str(msg.get("model_name", "")),
            model_version=str(msg.get("model_version", "")),
            id=msg.get("id"),
        )


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
