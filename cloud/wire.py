"""The wire-protocol interface of an infer call, which the native protocol and v2 implement alike.

Both HTTP stacks (the front door and aiohttp's routes) serve an infer request through it and
nothing else, so neither has a branch per protocol: :func:`start` decodes the body with
:meth:`Wire.decode` and queues the call on :class:`~tandem.cloud.inference.Inference`,
:meth:`Wire.reply` encodes the outcome.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from tandem.shared import protocol as p
from tandem.shared.errors import TandemError

from .body import read_body
from .inference import MODEL_KEY, REQUEST_ID_KEY, Call, Inference, Outcome, header_dict

__all__ = ["Decoded", "Wire", "start", "respond"]

#: Bodies below this are sent uncompressed even when the client accepts compression.
_COMPRESS_MIN_BYTES = 4096


#: What a protocol's request asks for: (the request, with ``inputs`` ({name: ndarray}), which
#: :meth:`Wire.reply` takes; the outputs asked for, None for all; priority; timeout in seconds or
#: None). A plain tuple: a NamedTuple's constructor costs a request ~0.3 us.
Decoded = tuple[Any, "list[str] | None", int, "float | None"]


class Wire(Protocol):
    #: The request header :meth:`decode` reads besides the deadline (native: the priority; v2: the
    #: length of the JSON header before binary tensors).
    option_header: str
    #: Whether aiohttp compresses large answers for a client that accepts it.
    compresses: bool

    def decode(self, body: bytes | memoryview, option: str | None, deadline: str | None) -> Decoded:
        """Decode an infer request; raises the :class:`~tandem.shared.errors.TandemError` answering
        a malformed one."""

    def reply(self, inference: Inference, outcome: Outcome, request: Any, request_id: str) -> tuple[str, bytes]:
        """(header lines, each ending in CRLF; body) of a successful answer."""


def start(
    wire: Wire, inference: Inference, model: str, version: str | None, body: bytes | memoryview,
    option: str | None, deadline: str | None,
) -> tuple[Call, Any]:
    """Resolve the model, decode the request and queue it: (the call, the decoded request for
    :meth:`Wire.reply`). Both HTTP stacks call this; a refused request counts as the model's failure."""
    served = inference.resolve(model, version)
    try:
        request, outputs, priority, timeout_s = wire.decode(body, option, deadline)
    except TandemError as e:
        served.metrics.failure(e.code)
        raise
    return inference.start(served, request.inputs, outputs=outputs, priority=priority, timeout_s=timeout_s), request


async def respond(wire: Wire, inference: Inference, request: web.Request, max_body: int, read_timeout_s: float) -> web.Response:
    """aiohttp's infer route for ``wire``: read the body, start, wait, reply. Records the model on the
    request as it becomes known, so that error answers and the access log name it."""
    model, version = request.match_info["model"], request.match_info.get("version")
    request[MODEL_KEY] = inference.resolve(model, version)
    body = await read_body(request, max_body, read_timeout_s)
    headers = request.headers
    option, deadline = headers.get(wire.option_header), headers.get(p.HEADER_DEADLINE_MS)
    call, decoded = start(wire, inference, model, version, body, option, deadline)
    request[MODEL_KEY] = call.served
    outcome = await inference.wait(call)
    request[MODEL_KEY] = outcome.model
    head, payload = wire.reply(inference, outcome, decoded, request[REQUEST_ID_KEY])
    response = web.Response(body=payload, headers=header_dict(head))
    if wire.compresses and len(payload) >= _COMPRESS_MIN_BYTES and headers.get("Accept-Encoding"):
        response.enable_compression()
    return response
