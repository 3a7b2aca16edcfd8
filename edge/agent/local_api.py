"""The local API apps on the device call: HTTP on loopback and a Unix socket.

Routes::

    POST /v1/models/{m}/infer                     native msgpack (shared/protocol.py) + "route" in the reply
    POST /v1/models/{m}/versions/{v}/infer        same, only if {v} is the active version
    POST /v2/models/{m}/infer                     Open Inference Protocol v2 infer (JSON / binary extension)
    POST /v1/feedback                             {"records": [...]} (JSON or msgpack) into the outbox
    GET  /v1/models                               tracked models and their active versions
    GET  /v1/status                               what ``tandem agent status`` shows
    GET  /v2/health/live, /v2/health/ready

The call's budget travels in the request's ``parameters`` (``latency_ms``, ``max_cost``,
``local_only``, ``policy``, ``target_accuracy``) or in ``X-Tandem-Latency-Ms``, ``X-Tandem-Max-Cost``,
``X-Tandem-Local-Only``, ``X-Tandem-Policy`` headers; ``X-Tandem-Deadline-Ms`` (or ``deadline_ms``) is
the latency budget when none is given. Replies carry ``X-Tandem-Tier`` and ``X-Tandem-Route-Reason``.
Errors are ``{"error", "code"}`` in msgpack on native routes and JSON elsewhere, with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from tandem.shared.errors import InvalidInput, ModelNotFound, PayloadTooLarge, RequestTimeout, TandemError, Unavailable
from tandem.shared.protocol import (
    CONTENT_TYPE,
    HEADER_DEADLINE_MS,
    HEADER_MODEL_VERSION,
    HEADER_REQUEST_ID,
    InferRequest,
)
from tandem.shared.tensors import encode_tensors, packb, unpackb

from .routing import BUDGET_FIELDS, budget_from

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)

HEADER_TIER = "X-Tandem-Tier"
HEADER_ROUTE_REASON = "X-Tandem-Route-Reason"

_AGENT = web.AppKey("agent", object)


def create_app(agent: "Agent") -> web.Application:
    app = web.Application(client_max_size=agent.config.max_request_bytes, middlewares=[_errors])
    app[_AGENT] = agent
    app.router.add_post("/v1/models/{model}/infer", _native_infer)
    app.router.add_post("/v1/models/{model}/versions/{version}/infer", _native_infer)
    app.router.add_post("/v2/models/{model}/infer", _v2_infer)
    app.router.add_post("/v2/models/{model}/versions/{version}/infer", _v2_infer)
    app.router.add_post("/v1/feedback", _feedback)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/v2/health/live", _live)
    app.router.add_get("/v2/health/ready", _ready)
    return app


def _is_native(request: web.Request) -> bool:
    return request.path.startswith("/v1/models/")


def _error_response(request: web.Request, status: int, message: str, code: str) -> web.Response:
    body = {"error": message, "code": code}
    if _is_native(request):
        return web.Response(status=status, body=packb(body), content_type=CONTENT_TYPE)
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except TandemError as e:
        resp = _error_response(request, e.status, e.message, e.code)
        if e.status in (429, 503):
            resp.headers["Retry-After"] = str(max(1, math.ceil(getattr(e, "retry_after", 1.0))))
        return resp
    except web.HTTPRequestEntityTooLarge:
        e2 = PayloadTooLarge(f"request body exceeds the local API's limit of {request.app[_AGENT].config.max_request_bytes} bytes")
        return _error_response(request, e2.status, e2.message, e2.code)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
        message = f"{request.method} {request.path}: {e.reason}"
        return _error_response(request, e.status, message, code)
    except Exception as e:  # a bug must still answer with the error shape, not drop the connection
        log.exception("local API handler failed")
        return _error_response(request, 500, f"internal error: {type(e).__name__}: {e}", "internal")


def _agent(request: web.Request) -> "Agent":
    return request.app[_AGENT]  # type: ignore[return-value]


async def _read_body(request: web.Request) -> bytes:
    timeout = _agent(request).config.read_timeout_s
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None


async def _route_call(request: web.Request, model: str, version: str | None, inputs: dict[str, np.ndarray],
                      budget: dict[str, Any], request_id: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    agent = _agent(request)
    slot = agent.routers.get(model)
    if slot is None:
        if model in agent.tracked:
            raise ModelNotFound(f"model {model} has no installed version yet (the agent is still fetching it)")
        raise ModelNotFound(f"model {model} is not served by this agent (it tracks: {', '.join(agent.tracked) or 'nothing'})")
    async with slot.use() as router:
        if version is not None and version != router.version:
            raise ModelNotFound(f"{model}:{version} is not the active version (active: {router.version})")
        try:
            outputs, route = await router.infer(inputs, budget)
        except TandemError as e:
            if e.status >= 500:  # the router could not serve; a malformed call is the app's, not a route
                await agent.record_route(model, router.version, request_id, {"tier": "failed", "error": e.code})
            raise
        await agent.record_route(model, router.version, request_id, route)
        return outputs, route, router.version


def _deadline(request: web.Request, body_deadline: float | None) -> float | None:
    if body_deadline is not None:
        return body_deadline
    raw = request.headers.get(HEADER_DEADLINE_MS)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(f"header {HEADER_DEADLINE_MS} must be a number of milliseconds, got {raw!r}") from None


async def _native_infer(request: web.Request) -> web.Response:
    ctype = request.headers.get("Content-Type", CONTENT_TYPE).split(";")[0].strip().lower()
    if ctype not in (CONTENT_TYPE, "application/x-msgpack", "application/octet-stream", ""):
        raise InvalidInput(f"native infer takes {CONTENT_TYPE} bodies, got {ctype}; use /v2/models/.../infer for JSON")
    body = await _read_body(request)
    if not body:
        raise InvalidInput("empty request body: expected a msgpack map with 'inputs'")
    req = InferRequest.from_wire(body)
    budget = budget_from(req.parameters, request.headers, _deadline(request, req.deadline_ms))
    request_id = req.id or request.headers.get(HEADER_REQUEST_ID)
    model = request.match_info["model"]
    outputs, route, version = await _route_call(request, model, request.match_info.get("version"),
                                                req.inputs, budget, request_id)
    if req.outputs is not None:
        missing = [o for o in req.outputs if o not in outputs]
        if missing:
            raise InvalidInput(f"unknown output(s) {missing}; the model has {sorted(outputs)}")
        outputs = {k: outputs[k] for k in req.outputs}
    msg: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": encode_tensors(outputs),
                           "route": to_plain(route)}
    if request_id is not None:
        msg["id"] = request_id
    return web.Response(body=packb(msg), content_type=CONTENT_TYPE, headers=_route_headers(route, version, request_id))


def _route_headers(route: dict[str, Any], version: str, request_id: str | None) -> dict[str, str]:
    h = {HEADER_TIER: str(route.get("tier")), HEADER_ROUTE_REASON: _header_safe(str(route.get("reason", ""))),
         HEADER_MODEL_VERSION: version}
    if request_id:
        h[HEADER_REQUEST_ID] = _header_safe(request_id)
    return h


_ASCII = str.maketrans({"≥": ">=", "≤": "<=", "→": "->", "×": "x", "…": "...", "µ": "u"})


def _header_safe(s: str) -> str:
    """HTTP header values are ASCII; route reasons use a few symbols."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in s.translate(_ASCII))[:200]


def to_plain(obj: Any) -> Any:
    """Route dicts may hold numpy scalars; msgpack and JSON want plain Python."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


async def _v2_infer(request: web.Request) -> web.Response:
    try:
        from tandem.shared import v2
    except ImportError:
        raise TandemError("the Open Inference Protocol v2 codec is not available in this build") from None
    return await v2_infer(request, v2)


async def v2_infer(request: web.Request, v2: Any) -> web.Response:
    body = await _read_body(request)
    raw_len = request.headers.get(v2.HEADER_LENGTH)
    try:
        header_length = int(raw_len) if raw_len is not None else None
    except ValueError:
        raise InvalidInput(f"header {v2.HEADER_LENGTH} must be an integer, got {raw_len!r}") from None
    req = v2.parse_infer_request(body, header_length)
    # Standard v2 parameters (priority, timeout, binary_data_output) ride along with the budget.
    params = {k: v for k, v in req.parameters.items() if k in BUDGET_FIELDS}
    timeout_us = req.timeout_us()
    budget = budget_from(params, request.headers, _deadline(request, timeout_us / 1e3 if timeout_us else None))
    model = request.match_info["model"]
    outputs, route, version = await _route_call(request, model, request.match_info.get("version"),
                                                req.inputs, budget, req.id)
    resp_body, headers = v2.encode_infer_response(model, version, outputs, request=req, id=req.id,
                                                  parameters={"tandem_route": json.dumps(to_plain(route))})
    headers = dict(headers)
    headers.update(_route_headers(route, version, req.id))
    return web.Response(body=resp_body, headers=headers)


async def _feedback(request: web.Request) -> web.Response:
    ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
    raw = await _read_body(request)
    try:
        doc = unpackb(raw) if ctype in (CONTENT_TYPE, "application/x-msgpack") else json.loads(raw)
    except TandemError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"feedback body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise InvalidInput('feedback body must be {"records": [...]}')
    agent = _agent(request)
    ids = await agent.enqueue(doc["records"])
    return web.json_response({"accepted": len(ids), "ids": ids})


async def _models(request: web.Request) -> web.Response:
    agent = _agent(request)
    return web.json_response({"models": [
        {"name": name, "active": (agent.routers[name].router.version if name in agent.routers else None)}
        for name in agent.tracked
    ]})


async def _status(request: web.Request) -> web.Response:
    from .status import collect

    return web.json_response(to_plain(collect(_agent(request).config.data_dir)))


async def _live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _ready(request: web.Request) -> web.Response:
    agent = _agent(request)
    missing = [m for m in agent.tracked if m not in agent.routers]
    if missing:
        raise Unavailable(f"no active version yet for: {', '.join(missing)}")
    return web.json_response({"ready": True})
