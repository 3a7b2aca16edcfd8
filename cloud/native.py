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

from .body import read_body
from .inference import MODEL_KEY, REQUEST_ID_KEY, Inference, deadline_seconds

__all__ = ["NativeAPI"]


class NativeAPI:
    def __init__(self, inference: Inference, max_body_bytes: int) -> None:
        self._inference = inference
        self._max_body = max_body_bytes

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/models/{model}/infer", self.infer)
        app.router.add_post("/v1/models/{model}/versions/{version}/infer", self.infer)

    async def infer(self, request: web.Request) -> web.Response:
        inference = self._inference
        served = inference.resolve(request.match_info["model"], request.match_info.get("version"))
        request[MODEL_KEY] = served
        try:
            req = p.InferRequest.from_wire(await read_body(request, self._max_body))
            priority = req.priority
            header_priority = request.headers.get(p.HEADER_PRIORITY)
            if header_priority is not None:
                try:
                    priority = int(header_priority)
                except ValueError:
                    raise InvalidInput(f"{p.HEADER_PRIORITY} must be an integer, got {header_priority!r}") from None
            timeout_s = deadline_seconds(request.headers.get(p.HEADER_DEADLINE_MS), req.deadline_ms)
        except TandemError as e:
            served.metrics.failure(e.code)
            raise
        outcome = await inference.infer(
            served.name, request.match_info.get("version"), req.inputs, outputs=req.outputs, priority=priority, timeout_s=timeout_s
        )
        served = request[MODEL_KEY] = outcome.model
        body = p.InferResponse(outcome.outputs, served.name, served.version, id=req.id or request.get(REQUEST_ID_KEY)).to_wire()
        headers = inference.headers(outcome)
        headers["Content-Type"] = p.CONTENT_TYPE
        return web.Response(body=body, headers=headers)
