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

Only apps on this device may call it, not web pages open in its browser: a request whose ``Host`` is not
a loopback name or address (DNS rebinding) or that carries a foreign ``Origin`` (a cross-site request)
gets 403, and write routes take only their own content types (400 otherwise), so a page cannot post
through a form or a ``text/plain`` fetch. With ``local_token`` configured every route but
``/v2/health/*`` needs it (``Authorization: Bearer ...`` or ``X-Tandem-Token``), else 401.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web

from tandem.shared.errors import (
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    RequestTimeout,
    TandemError,
    Unauthorized,
    Unavailable,
)
from tandem.shared.protocol import (
    CONTENT_TYPE,
    HEADER_DEADLINE_MS,
    HEADER_MODEL_VERSION,
    HEADER_REQUEST_ID,
    InferRequest,
)
from tandem.shared.tensors import encode_tensors, packb, unpackb

from .config import is_loopback
from .routing import BUDGET_FIELDS, budget_from

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)

HEADER_TIER = "X-Tandem-Tier"
HEADER_ROUTE_REASON = "X-Tandem-Route-Reason"

HEADER_TOKEN = "X-Tandem-Token"
MSGPACK_TYPES = (CONTENT_TYPE, "application/x-msgpack")
JSON_TYPE = "application/json"

_AGENT: web.AppKey[Agent] = web.AppKey("agent")


class Forbidden(TandemError):
    status = 403
    code = "forbidden"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


def create_app(agent: Agent) -> web.Application:
    app = web.Application(client_max_size=agent.config.max_request_bytes, middlewares=[_errors, _guard])
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


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Who may call: apps on this device, never a web page (checked before the body is read)."""
    config = _agent(request).config
    host = request.headers.get("Host")
    if host is not None and not config.allow_remote and not _via_unix_socket(request) and not _loopback_host(host):
        raise Forbidden(f"Host {host!r} is not this device's loopback address; the local API answers only "
                        "127.0.0.1, localhost or [::1] (a web page must not reach it through DNS rebinding)")
    origin = request.headers.get("Origin")
    if origin is not None and not _loopback_origin(origin):
        raise Forbidden(f"requests from the web origin {origin!r} are refused: the local API is for apps on "
                        "this device, not for web pages")
    if config.local_token and not request.path.startswith("/v2/health/"):
        _check_token(request, config.local_token)
    return await handler(request)


def _via_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def _loopback_host(host: str) -> bool:
    """``127.0.0.1``, ``localhost``, ``[::1]`` (any loopback address), each with or without a port."""
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, sep, port = host.partition(":")
        if sep and not port.isdigit():
            return False
    return is_loopback(name.lower())


def _loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            return False  # "null" (sandboxed frames, file://) and other schemes
        _ = parts.port  # a malformed port raises here
    except ValueError:
        return False
    return is_loopback(parts.hostname)


def _check_token(request: web.Request, token: str) -> None:
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get(HEADER_TOKEN)
    if not given:
        raise Unauthorized(f"this agent requires its local token: send 'Authorization: Bearer <local_token>' "
                           f"or '{HEADER_TOKEN}: <local_token>'")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("the local token does not match this agent's local_token")


def _content_type(request: web.Request, allowed: tuple[str, ...], what: str) -> str:
    """The request's media type if it is one ``allowed``; else 400 (a form or text/plain post from a page)."""
    raw = request.headers.get("Content-Type")
    ctype = raw.split(";")[0].strip().lower() if raw else ""
    if ctype not in allowed:
        got = f"Content-Type {ctype}" if ctype else "no Content-Type"
        raise UnsupportedMediaType(f"{what} takes {' or '.join(allowed)} bodies, got {got}")
    return ctype


def _agent(request: web.Request) -> Agent:
    return request.app[_AGENT]


async def _read_body(request: web.Request) -> bytes:
    timeout = _agent(request).config.read_timeout_s
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
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
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype == JSON_TYPE:
        raise UnsupportedMediaType(f"native infer takes {CONTENT_TYPE} bodies, got {ctype}; use /v2/models/.../infer for JSON")
    _content_type(request, (*MSGPACK_TYPES, "application/octet-stream"), "native infer")
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
    _content_type(request, (v2.JSON_CONTENT_TYPE, v2.BINARY_CONTENT_TYPE), "v2 infer")
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
    ctype = _content_type(request, (JSON_TYPE, *MSGPACK_TYPES), "feedback")
    raw = await _read_body(request)
    try:
        doc = unpackb(raw) if ctype in MSGPACK_TYPES else json.loads(raw)
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
