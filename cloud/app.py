"""The cloud server as an aiohttp application: ``create_app(ServerConfig) -> web.Application``.

Routes: the native msgpack protocol (:mod:`.native`), Open Inference Protocol v2 (:mod:`.v2`),
``/metrics`` (Prometheus), the device registry and the feedback store. One middleware does, per
request and in this order: request id, API-key auth (everything but ``/v2/health/live``), error
mapping (any :class:`TandemError` -> its status with ``{"error", "code"}``, msgpack on native
routes, JSON elsewhere; 503/429 with ``Retry-After``) and a JSON access-log line. Body size is
limited by ``max_body_bytes`` (also after gzip/deflate decoding, see :mod:`.body`).

Start-up loads and warms every model before ``/v2/health/ready`` answers 200; shutdown stops
accepting, answers everything already accepted, then releases the sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from tandem.shared import protocol as p
from tandem.shared.errors import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TandemError,
)

from .body import MIN_RATE_KEY, responded
from .config import ServerConfig
from .control import ModelControl
from .core import Core
from .feedback import FeedbackStore
from .gate import HEADER_WORKER, Gate
from .inference import MODEL_KEY, REQUEST_ID_KEY
from .job_routes import attach_jobs
from .metrics import CONTENT_TYPE_LATEST
from .monitor import Monitoring
from .native import NativeAPI
from .registry import Registry
from .v2 import V2API

__all__ = ["create_app", "make_runner", "aiohttp_protocols", "ServerState", "STATE", "HEADER_WORKER"]

#: How often a worker copies its pending counts into the shared metric files (multiprocess mode).
_PENDING_REFRESH_S = 0.05
_MIN_WAIT_S = 0.01

_log = logging.getLogger("tandem.cloud")
_VERSIONS = ((1, 0), (1, 1))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServerState(Core):
    """Everything one server instance holds, its core and the app's state; ``app[STATE]``."""

    #: Started (and, with --workers N, told by the supervisor that every worker is): see is_ready.
    ready: bool = False
    #: The models found in the repository at start-up: ready only while each has a version loaded.
    expected: set[str] = field(default_factory=set)
    extras: list[Any] = field(default_factory=list)  # registry, feedback store
    #: Model load/unload: the repository itself, or with --workers N a WorkerControl (control.py).
    control: ModelControl = field(init=False)
    #: When the drain must end (time.monotonic()); set as it begins (server.py).
    drain_by: float | None = None

    def __post_init__(self) -> None:
        self.control = self.repository

    def is_ready(self) -> bool:
        """What /v2/health/ready says: started, and every model found at start-up loaded."""
        return self.ready and all(self.repository.versions(name) for name in self.expected)

    def drain_left(self) -> float:
        """Seconds the drain's next step may wait: what is left of ``shutdown_timeout_s``, so that
        its steps (front door, aiohttp's handlers, job runs, batchers) share the one bound."""
        if self.drain_by is None:
            return self.config.shutdown_timeout_s
        # Never 0: aiohttp reads a timeout of 0 as none at all.
        return max(self.drain_by - time.monotonic(), _MIN_WAIT_S)

    def not_served(self) -> list[str]:
        """Why each model found at start-up (and each entry that is not a bundle) is not served."""
        reasons = list(self.repository.strays())
        for row in self.repository.index():
            if row["name"] in self.expected and not self.repository.versions(row["name"]) and row["state"] != "READY":
                reasons.append(f"model {row['name']} version {row['version']}: {row['reason'] or row['state']}")
        return reasons


STATE = web.AppKey("tandem_state", ServerState)


def _from_http_exception(e: web.HTTPException) -> TandemError:
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(f"request body too large: {e.text or e.reason}")
    if isinstance(e, web.HTTPNotFound):
        return NotFound("no such route")
    if isinstance(e, web.HTTPMethodNotAllowed):
        not_allowed = InvalidInput(f"method {e.method} not allowed here; allowed: {', '.join(sorted(e.allowed_methods))}")
        not_allowed.status = 405
        return not_allowed
    err = TandemError(e.reason or "HTTP error")
    err.status = e.status
    err.code = "http_error"
    return err


def _middleware(gate: Gate) -> Any:
    """aiohttp's side of the :class:`Gate`: the same ids, auth, error bodies and access log as the
    front door gives the infer routes."""

    def error_response(request: web.Request, error: TandemError) -> web.Response:
        status, headers, body = gate.error_reply(error, request.path, request.get(MODEL_KEY))
        return web.Response(status=status, body=body, headers=headers)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        rid = request[REQUEST_ID_KEY] = gate.request_id(request.headers.get(p.HEADER_REQUEST_ID))
        # RFC 9112: an HTTP/1.1 request with no Host or several is answered 400, and so is a
        # version other than 1.0 and 1.1 (the front door's framing refuses the same, so both
        # stacks answer alike).
        version_ok = request.version in _VERSIONS
        bad_host = not version_ok or (request.version >= (1, 1) and len(request.headers.getall("Host", ())) != 1)
        try:
            if bad_host:
                raise InvalidInput(
                    "malformed HTTP request: an HTTP/1.1 request needs exactly one Host header" if version_ok
                    else f"malformed HTTP request: HTTP/{request.version.major}.{request.version.minor} is not supported"
                )
            gate.check_auth(request.path, request.headers.get("Authorization"))
            response = await handler(request)
        except TandemError as e:
            response = error_response(request, e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = error_response(request, _from_http_exception(e))
        except RequestPayloadError as e:
            # A body that cannot be inflated (bad gzip/deflate) or was cut short by the client.
            response = error_response(request, InvalidInput(f"request body cannot be read: {str(e).strip()}"))
        except ConnectionResetError:
            # The client went away before sending its whole body: nothing broke here, no traceback.
            response = error_response(request, InvalidInput("the client closed the connection before sending the whole body"))
        except (ValueError, TypeError, KeyError) as e:
            # aiohttp raises these for malformed framing it detects late (e.g. a bad content-length).
            response = error_response(request, InvalidInput(f"malformed request: {e}"))
        except Exception as e:  # noqa: BLE001 - one broken request must not take the server down
            _log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_response(request, TandemError(f"internal error: {type(e).__name__}"))
        response.headers[p.HEADER_REQUEST_ID] = rid
        for name, value in gate.extra_headers:
            response.headers[name] = value
        if gate.logs_access:
            gate.log_access(
                rid, request.method, request.path, response.status, (time.perf_counter() - start) * 1e3,
                request.get(MODEL_KEY), request.remote,
            )
        if gate.draining or bad_host:
            response.force_close()
        responded(request, response)
        if response.status == RequestTimeout.status:
            # The client stopped sending mid-body: answer and close now. Left to aiohttp, the
            # connection would linger 10 s reading the rest of a body that is not coming.
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response

    return middleware


def _attach_extras(app: web.Application, state: ServerState) -> None:
    """The device registry (always on) and the feedback store, over the same repository."""
    config = state.config
    registry = Registry(config.repository)
    registry.add_routes(app)
    state.extras.append(registry)
    store = FeedbackStore(config.feedback_path(), max_body_bytes=config.max_body_bytes, read_timeout_s=config.read_timeout_s)
    store.add_routes(app)
    state.extras.append(store)
    # Asynchronous jobs (Prefer: respond-async, /v1/jobs): see job_routes.py.
    attach_jobs(app, config, state.inference, state.is_ready, state.drain_left)


def create_app(config: ServerConfig) -> web.Application:
    """The server application. Models load (and warm up) when the app starts, not here."""
    state = ServerState.build(config)
    metrics, repository, inference = state.metrics, state.repository, state.inference
    # auto_decompress off: cloud/body.py inflates bodies itself (see there why).
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[_middleware(state.gate)],
        handler_args={"auto_decompress": False},
    )
    app[STATE] = state
    app[MIN_RATE_KEY] = config.min_body_rate

    NativeAPI(inference, config.max_body_bytes, config.read_timeout_s).add_routes(app)
    V2API(
        inference, repository, state.is_ready, config.max_body_bytes, config.read_timeout_s, state.metrics,
        control=lambda: state.control,
    ).add_routes(app)

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics_handler)
    _attach_extras(app, state)
    # Drift and live quality (cloud/monitor.py): reads the feedback store _attach_extras made.
    monitoring = Monitoring(config.monitoring, repository, metrics, next((e for e in state.extras if isinstance(e, FeedbackStore)), None))
    monitoring.add_routes(app)

    refresher: list[asyncio.Task[None]] = []

    async def refresh_pending() -> None:
        # Another worker's /metrics reads our pending count from the shared files, not from us.
        while True:
            metrics.refresh()
            await asyncio.sleep(_PENDING_REFRESH_S)

    async def on_startup(app: web.Application) -> None:
        state.expected = set(repository.scan())
        await repository.start()
        await monitoring.start()
        if metrics.multiprocess:
            refresher.append(asyncio.create_task(refresh_pending()))
        state.ready = True
        for m in repository.loaded():
            _log.info("serving %s:%s on %s (x%d)", m.name, m.version, ",".join(m.engine.providers), m.engine.instances)

    async def on_shutdown(app: web.Application) -> None:
        state.ready = False

    async def on_cleanup(app: web.Application) -> None:
        state.ready = False
        await monitoring.close()
        await repository.close(state.drain_left())
        state.gate.close()
        for task in refresher:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for extra in state.extras:
            close = getattr(extra, "close", None)
            if close is not None:
                result = close()
                if hasattr(result, "__await__"):
                    await result

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


class _RequestHandler(web.RequestHandler):
    """aiohttp's protocol for one connection, answering a request its HTTP parser rejects (a line
    over 8190 bytes, conflicting lengths, bytes that are not HTTP) like every other Tandem error.

    Why: aiohttp answers those in text/plain and logs each at ERROR with a traceback, so any
    client sending garbage would fill the server's log with alarms about nothing it did wrong.
    Here: ``{"error", "code"}`` in JSON and one INFO line. A 5xx keeps aiohttp's traceback (a bug).
    """

    __slots__ = ()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = TandemError(f"internal error: {type(exc).__name__}" if exc is not None else "internal error")
        else:
            reason = " ".join(str(getattr(exc, "message", None) or message or exc or "").split())[:300]
            _log.info("malformed HTTP request from %s: %s", request.remote, reason)
            error = InvalidInput(f"malformed HTTP request: {reason}")
        if request.writer.output_size > 0:
            raise ConnectionError("a response was partly sent already: no room for the error")
        response = web.Response(status=status, body=json.dumps(error.to_dict()).encode(), content_type="application/json")
        response.force_close()
        return response


def aiohttp_protocols(runner: web.AppRunner) -> Callable[[], web.RequestHandler]:
    """Makes aiohttp's protocol for one connection of the app, with :class:`_RequestHandler`'s
    errors: the runner's own protocol, made a :class:`_RequestHandler` (a subclass that adds no
    state, so the object's class can change; aiohttp's constructor is left to aiohttp)."""
    server = runner.server
    if server is None:
        raise RuntimeError("call runner.setup() before listen()")

    def make() -> web.RequestHandler:
        handler = server()
        handler.__class__ = _RequestHandler
        return handler

    return make


def make_runner(app: web.Application) -> web.AppRunner:
    """The aiohttp runner of a Tandem app: its keep-alive the server's, no access log of its own
    (the app's middleware writes it), signals left to the caller."""
    config: ServerConfig = app[STATE].config
    return web.AppRunner(
        app, access_log=None, shutdown_timeout=config.shutdown_timeout_s, handle_signals=False,
        keepalive_timeout=config.keepalive_timeout_s,
    )



def describe_models(app: web.Application) -> list[str]:
    """One line per loaded model version: name, version, providers really in use, instances."""
    state = app[STATE]
    return [
        f"{m.name}:{m.version}  providers={','.join(m.engine.providers)}  instances={m.engine.instances}"
        f"  intra_op_threads={m.engine.intra_op_threads}  warm-up={m.warmup_s:.2f}s"
        for m in state.repository.loaded()
    ]

