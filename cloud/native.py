"""Handlers of the native msgpack protocol (``POST /v1/models/{m}[/versions/{v}]/infer``).

The body is decoded with the shared codec (``np.frombuffer`` views over the received bytes, no
JSON, no base64), the request goes through :class:`~tandem.cloud.inference.Inference`, and the
response carries the X-Tandem-* server timing. Errors are msgpack ``{"error", "code"}`` (the app's
middleware encodes them).
"""

from __future__ import annotations

from aiohttp import web

from tandem.shared import protocol as p
from tandem.shared.errors import InvalidInput, TandemError

from .inference import REQUEST_ID_KEY, Call, Inference, Outcome, deadline_seconds, header_dict

__all__ = ["NativeAPI", "start", "reply", "reply_text"]


def start(
    inference: Inference, model: str, version: str | None, body: bytes | memoryview,
    priority_header: str | None, deadline_header: str | None,
) -> tuple[Call, p.InferRequest]:
    """Decode a native infer request and queue it; both HTTP stacks call this (and :func:`reply`)."""
    served = inference.resolve(model, version)
    try:
        req = inference.decoder.decode(body)
        priority = req.priority
        if priority_header is not None:
            try:
                priority = int(priority_header)
            except ValueError:
                raise InvalidInput(f"{p.HEADER_PRIORITY} must be an integer, got {priority_header!r}") from None
        timeout_s = deadline_seconds(deadline_header, req.deadline_ms)
    except TandemError as e:
        served.metrics.failure(e.code)
        raise
    call = inference.start(served, req.inputs, outputs=req.outputs, priority=priority, timeout_s=timeout_s)
    return call, req


def reply(inference: Inference, outcome: Outcome, req: p.InferRequest, request_id: str) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a successful native response."""
    head, body = reply_text(inference, outcome, req, request_id)
    return header_dict(head), body


def reply_text(inference: Inference, outcome: Outcome, req: p.InferRequest, request_id: str) -> tuple[str, bytes]:
    """:func:`reply` with the headers as HTTP header lines (the front door writes them as they are)."""
    served = outcome.model
    body = inference.encoder.encode(outcome.outputs, served.name, served.version, req.id or request_id)
    return inference.header_text(outcome) + _CONTENT_TYPE_LINE, body


_CONTENT_TYPE_LINE = f"Content-Type: {p.CONTENT_TYPE}\r\n"


class NativeAPI:
    def __init__(self, inference: Inference, max_body_bytes: int, read_timeout_s: float) -> None:
        self._inference = inference
        self._max_body = max_body_bytes
        self._read_timeout = read_timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/models/{model}/infer", self.infer)
        app.router.add_post("/v1/models/{model}/versions/{version}/infer", self.infer)

    async def infer(self, request: web.Request) -> web.Response:
        inference, model, version = self._inference, request.match_info["model"], request.match_info.get("version")
        outcome, req = await inference.serve(
            request,
            lambda body: start(inference, model, version, body, request.headers.get(p.HEADER_PRIORITY), request.headers.get(p.HEADER_DEADLINE_MS)),
            self._max_body,
            self._read_timeout,
        )
        headers, body = reply(inference, outcome, req, request[REQUEST_ID_KEY])
        return web.Response(body=body, headers=headers)
