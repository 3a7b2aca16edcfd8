"""The native msgpack protocol (``POST /v1/models/{m}[/versions/{v}]/infer``) as a :class:`~.wire.Wire`.

The body is decoded with the shared codec (``np.frombuffer`` views over the received bytes, no
JSON, no base64), the request goes through :class:`~tandem.cloud.inference.Inference`, and the
response carries the X-Tandem-* server timing. Errors are msgpack ``{"error", "code"}`` (the gate
encodes them).
"""

from __future__ import annotations

from aiohttp import web

from tandem.shared import protocol as p
from tandem.shared.errors import InvalidInput

from .inference import Inference, Outcome, deadline_seconds, header_dict
from .wire import Decoded, respond

__all__ = ["NativeAPI", "NATIVE", "reply"]

_CONTENT_TYPE_LINE = f"Content-Type: {p.CONTENT_TYPE}\r\n"


class _Native:
    option_header = p.HEADER_PRIORITY
    compresses = False

    def decode(self, body: bytes | memoryview, option: str | None, deadline: str | None) -> Decoded:
        req = p.InferRequest.from_wire(body)
        priority = req.priority
        if option is not None:
            try:
                priority = int(option)
            except ValueError:
                raise InvalidInput(f"{p.HEADER_PRIORITY} must be an integer, got {option!r}") from None
        return req, req.outputs, priority, deadline_seconds(deadline, req.deadline_ms)

    def reply(self, inference: Inference, outcome: Outcome, request: p.InferRequest, request_id: str) -> tuple[str, bytes]:
        served = outcome.model
        body = p.InferResponse(outcome.outputs, served.name, served.version, request.id or request_id).to_wire()
        return inference.header_text(outcome) + _CONTENT_TYPE_LINE, body


#: The native protocol.
NATIVE = _Native()


def reply(inference: Inference, outcome: Outcome, req: p.InferRequest, request_id: str) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a successful native answer (the job runner's)."""
    head, body = NATIVE.reply(inference, outcome, req, request_id)
    return header_dict(head), body


class NativeAPI:
    def __init__(self, inference: Inference, max_body_bytes: int, read_timeout_s: float) -> None:
        self._inference = inference
        self._max_body = max_body_bytes
        self._read_timeout = read_timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/models/{model}/infer", self.infer)
        app.router.add_post("/v1/models/{model}/versions/{version}/infer", self.infer)

    async def infer(self, request: web.Request) -> web.Response:
        return await respond(NATIVE, self._inference, request, self._max_body, self._read_timeout)
