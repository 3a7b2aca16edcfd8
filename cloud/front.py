"""The front door: a lean HTTP/1.1 protocol serves the infer routes, aiohttp serves everything else.

Why: aiohttp spends ~40 µs of Python on every request (request object, router, middleware,
response object), and a full handler path cost ~100 µs here. On two cores that shared the
event loop with onnxruntime, it held ``tandem serve`` to ~38% of the digits CNN's raw
``session.run`` limit at 64 connections. This protocol frames and answers an infer request in
a few microseconds of Python, with no task per request: it queues the call on the model's batcher
and finishes on the future's callback.

How: every connection starts here. A request is taken only if it is *plain*: ``POST`` to
``/v1|v2/models/{m}[/versions/{v}]/infer``, ``HTTP/1.1``, ASCII headers within aiohttp's size
limits, exactly one ``Content-Length`` within ``max_body_bytes``, and no ``Transfer-Encoding``,
``Content-Encoding``, ``Expect``, ``Upgrade``, ``Connection: close``, query string or
percent-encoding (and, on v2, no ``Accept-Encoding`` asking for compression). Anything else goes,
as its exact bytes and with the rest of the connection, to aiohttp's own protocol for the same
app: the connection changes hands once, at a message boundary, after the front door has written
every response it owes on it. So every unusual request gets aiohttp's full, strict treatment,
and both stacks share one policy (:class:`~tandem.cloud.gate.Gate`) and one inference core.

A connection remembers its previous request head: the same head bytes again (the common case: a
client repeats one request layout) are not parsed again. Pipelined requests are answered in order. Set ``front_door = false`` to serve with aiohttp alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tandem.shared import protocol as p
from tandem.shared import v2 as v2codec
from tandem.shared.errors import InvalidInput, RequestTimeout, TandemError, Unavailable

from . import native, v2
from .app import STATE
from .inference import header_lines

__all__ = ["FrontDoor", "listen"]

_log = logging.getLogger("tandem.cloud")

#: Largest request head taken here; aiohttp's limits are 8190 bytes per line and per field.
_MAX_HEAD = 8190
#: Pipelined requests one connection may have in flight before the front door stops reading it.
_MAX_IN_FLIGHT = 128
#: Seconds a connection may sit idle before it is closed (aiohttp's keep-alive default).
_KEEPALIVE_S = 75.0
_INFER = re.compile(rb"/(v1|v2)/models/([^/]+)(?:/versions/([^/]+))?/infer")
_HEAD_END = b"\r\n\r\n"
_HANDOFF = object()  # _frame's answer for a message the front door does not take
#: Request headers whose presence alone sends the message to aiohttp.
_NOT_PLAIN = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"})
#: Request headers the front door reads (everything else is checked, then ignored, as aiohttp would).
_KEEP = frozenset({b"x-request-id", b"authorization", b"x-tandem-priority", b"x-tandem-deadline-ms", b"inference-header-content-length"})
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


class _Head:
    """What the front door needs from one request head (immutable: cached and shared by the
    requests of a connection that repeat the same head bytes)."""

    __slots__ = ("protocol", "model", "version", "path", "headers", "length")

    def __init__(self, protocol: str, model: str, version: str | None, path: str, headers: dict[str, str], length: int) -> None:
        self.protocol = protocol  # "v1" (native msgpack) or "v2"
        self.model = model
        self.version = version
        self.path = path
        self.headers = headers  # lower-case names; the first value of each
        self.length = length  # of the body


def _parse_head(head: bytes, max_body: int) -> _Head | None:
    """The head of a plain infer request, or None when the message is not one the front door takes."""
    if not head.isascii() or b"\0" in head:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    match = _INFER.fullmatch(parts[1])
    if match is None or b"%" in parts[1]:
        return None
    n = len(lines) - 1
    if head.count(b"\n") != n or head.count(b"\r") != n:
        return None  # a bare CR or LF: aiohttp answers that
    headers: dict[str, str] = {}  # only the ones the front door reads; the first value of each
    length = None
    protocol = match.group(1)
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or b" " in name or b"\t" in name:
            return None  # obs-fold, malformed names: aiohttp answers those
        key = name.lower()
        if key == b"content-length":
            value = value.strip(b" \t")
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif key in _NOT_PLAIN:
            return None
        elif key in _KEEP:
            headers.setdefault(key.decode(), value.strip(b" \t").decode())
        elif key == b"content-encoding":
            if value.strip(b" \t").lower() != b"identity":
                return None
        elif key == b"connection":
            if b"close" in value.lower():
                return None
        elif key == b"accept-encoding" and protocol == b"v2":
            v = value.lower()
            if b"gzip" in v or b"deflate" in v:
                return None  # aiohttp compresses large v2 responses for clients that ask
    if length is None or length > max_body:
        return None
    version = match.group(3)
    return _Head(
        protocol.decode(), match.group(2).decode(), version.decode() if version is not None else None, parts[1].decode(), headers, length
    )


def _frame(buf: bytes | bytearray, pos: int, max_body: int, last: list[Any]) -> tuple[_Head, Any, int] | object | None:
    """(head, body, offset just past it) of the plain infer request starting at ``buf[pos]``; None
    when more bytes are needed; ``_HANDOFF`` when the message is not one the front door takes.

    ``last`` is the connection's [head bytes, _Head] of its previous request: clients repeat the
    same head request after request, and a repeated head is not parsed again."""
    end = buf.find(_HEAD_END, pos, pos + _MAX_HEAD + 4)
    if end < 0:
        return _HANDOFF if len(buf) - pos > _MAX_HEAD else None
    raw = bytes(buf[pos:end])
    if raw == last[0]:
        head = last[1]
    else:
        head = _parse_head(raw, max_body)
        if head is None:
            return _HANDOFF
        last[0], last[1] = raw, head
    start = end + 4
    stop = start + head.length
    if len(buf) < stop:
        return None
    body = memoryview(buf)[start:stop] if isinstance(buf, bytes) else bytes(buf[start:stop])
    return head, body, stop


class _Slot:
    """One request's place in its connection's response order."""

    __slots__ = ("rid", "path", "start", "data", "status", "served")

    def __init__(self, rid: str, path: str, start: float) -> None:
        self.rid = rid
        self.path = path
        self.start = start
        self.data: bytes | None = None  # the encoded response, once ready
        self.status = 0
        self.served: Any = None


class _Connection(asyncio.Protocol):
    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()  # bytes of a message not complete yet
        self._slots: deque[_Slot] = deque()
        self._handoff: bytearray | None = None  # bytes waiting for aiohttp once our responses are out
        self._last_head: list[Any] = [None, None]  # the previous request's head bytes and _Head
        self._paused = False
        self._eof = False
        self._timed_out = False  # answered 408: close once that answer is written, read nothing more
        self._remote: str | None = None
        self.last_active = time.monotonic()

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        if self._door._closing:
            transport.close()  # accepted just before the door closed: nothing was asked yet
            return
        self._door._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._door._connections.discard(self)
        self._transport = None
        self._slots.clear()  # their calls still finish (accepted work is done); nobody to tell

    def eof_received(self) -> bool | None:
        self._eof = True
        # Keep the socket open for the responses still owed (a client may half-close after sending).
        return True if self._slots else None

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._timed_out:
            return
        if self._handoff is not None:
            self._handoff += data
            return
        try:
            if self._buf:
                self._buf += data
                buf: bytes | bytearray = self._buf
            else:
                buf = data
            pos = self._consume(buf)
            if self._handoff is not None:
                self._handoff += buf[pos:]
                self._buf = bytearray()
                self._maybe_hand_off()
            elif buf is self._buf:
                del self._buf[:pos]
            else:
                self._buf = bytearray(data[pos:]) if pos < len(data) else bytearray()
        except Exception:  # noqa: BLE001 - a bug here must not take down the loop's other connections
            _log.exception("front door: dropping a connection after an internal error")
            self._door.internal_errors += 1
            self._door._metrics.front_errors.inc()
            self.close()

    # --- internals ------------------------------------------------------------------------------

    def _consume(self, buf: bytes | bytearray) -> int:
        """Serve every complete plain request in ``buf``; returns the offset of what is left."""
        pos = 0
        max_body = self._door._max_body
        while pos < len(buf):
            framed = _frame(buf, pos, max_body, self._last_head)
            if framed is None:
                break
            if framed is _HANDOFF:
                self._handoff = bytearray()
                break
            head, body, pos = framed  # type: ignore[misc]
            self._serve(head, body)
            if len(self._slots) >= _MAX_IN_FLIGHT and not self._paused and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()
        return pos

    def _serve(self, request: _Head, body: Any) -> None:
        door = self._door
        gate, inference = door._gate, door._inference
        h = request.headers
        slot = _Slot(gate.request_id(h.get("x-request-id")), request.path, time.perf_counter())
        self._slots.append(slot)
        door.served += 1  # published by FrontDoor._sync_metrics, not counted here (hot path)
        try:
            gate.check_auth(request.path, h.get("authorization"))
            if request.protocol == "v1":
                call, req = native.start(
                    inference, request.model, request.version, body, h.get("x-tandem-priority"), h.get("x-tandem-deadline-ms")
                )
            else:
                call, req = v2.start(
                    inference, request.model, request.version, body, h.get(v2codec.HEADER_LENGTH.lower()),
                    h.get("x-tandem-deadline-ms"),
                )
        except Exception as e:  # noqa: BLE001 - one broken request must not take the server down
            if not isinstance(e, TandemError):
                _log.exception("unhandled error on POST %s", request.path)
                e = TandemError(f"internal error: {type(e).__name__}")
            # Only a refused request needs the model looked up here (for its error headers and log).
            with contextlib.suppress(TandemError):
                slot.served = inference.resolve(request.model, request.version)
            self._fail(slot, e)
            return
        slot.served = call.served
        if call.future is None or call.future.done():
            self._finish(slot, request.protocol, call, req)
        else:
            call.future.add_done_callback(lambda _f: self._finish(slot, request.protocol, call, req))

    def _finish(self, slot: _Slot, protocol: str, call: Any, req: Any) -> None:
        inference = self._door._inference
        try:
            try:
                outcome = inference.finish(call)
            except asyncio.CancelledError:
                raise Unavailable("the request was cancelled before it ran (model unloading)") from None
            slot.served = outcome.model
            if protocol == "v1":
                head, body = native.reply_text(inference, outcome, req, slot.rid)
            else:
                body, head = v2.reply_text(inference, outcome, req)
            self._ready(slot, 200, head, body)
        except TandemError as e:
            self._fail(slot, e)
        except Exception as e:  # noqa: BLE001
            _log.exception("unhandled error on POST %s", slot.path)
            self._fail(slot, TandemError(f"internal error: {type(e).__name__}"))

    def _fail(self, slot: _Slot, error: TandemError) -> None:
        status, headers, body = self._door._gate.error_reply(error, slot.path, slot.served)
        self._ready(slot, status, header_lines(headers), body)

    def _ready(self, slot: _Slot, status: int, head: str, body: bytes) -> None:
        """Queue a response; ``head`` holds its own header lines, each ending in CRLF."""
        door = self._door
        slot.data = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n{head}{p.HEADER_REQUEST_ID}: {slot.rid}\r\n"
            f"Content-Length: {len(body)}\r\nDate: {door.date()}\r\n{door._closing_tail if self._timed_out or door._gate.draining else door._tail}"
        ).encode() + body
        slot.status = status
        self._flush()

    def _flush(self) -> None:
        """Write every ready response at the head of the order, then hand off or close if due."""
        gate = self._door._gate
        slots, transport = self._slots, self._transport
        log = gate.logs_access
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            if transport is not None and not transport.is_closing():
                transport.write(slot.data)  # type: ignore[arg-type]
            if log:
                ms = (time.perf_counter() - slot.start) * 1e3
                gate.log_access(slot.rid, "POST", slot.path, slot.status, ms, slot.served, self._remote)
        if self._paused and len(slots) < _MAX_IN_FLIGHT // 2 and self._handoff is None and transport is not None:
            self._paused = False
            transport.resume_reading()
        if not slots:
            if self._handoff is not None:
                self._maybe_hand_off()
            elif (self._eof or self._timed_out or self._door._gate.draining) and transport is not None:
                transport.close()

    def _maybe_hand_off(self) -> None:
        """Give the connection to aiohttp, with the bytes from the first request it must answer."""
        transport = self._transport
        if transport is None or self._slots:
            if transport is not None and not self._paused:
                self._paused = True
                transport.pause_reading()  # until our responses are written
            return
        data, self._handoff = bytes(self._handoff or b""), None
        door = self._door
        door.handed_off += 1
        door._metrics.front_handoffs.inc()
        door._connections.discard(self)
        handler = _HalfCloseGuard(door._aiohttp())
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        if data:
            handler.data_received(data)
        if self._eof:
            handler.eof_received()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def expire(self, now: float, read_timeout: float) -> None:
        """Close the connection if it sat idle past the keep-alive time, or answer 408 if the
        client left a request half-sent past ``read_timeout`` (the sweeper calls this)."""
        if self._slots or self._handoff is not None or self._timed_out:
            return  # we owe answers (or aiohttp is about to take over): the client is not the one stalling
        quiet = now - self.last_active
        if self._buf:
            if quiet > read_timeout:
                self._time_out(read_timeout)
        elif quiet > _KEEPALIVE_S:
            self.close()

    def _time_out(self, read_timeout: float) -> None:
        request_line = bytes(self._buf[: self._buf.find(b"\r\n")]).split(b" ")
        path = request_line[1].decode("ascii", "replace") if len(request_line) > 1 else "/"
        received = len(self._buf)
        self._buf = bytearray()
        self._timed_out = True
        slot = _Slot(self._door._gate.request_id(None), path, time.perf_counter())
        self._slots.append(slot)
        error = RequestTimeout(f"the client sent no byte of its request for {read_timeout:g} s ({received} bytes received)")
        status, headers, body = self._door._gate.error_reply(error, path, None)
        self._ready(slot, status, header_lines(headers), body)

    @property
    def owed(self) -> bool:
        """Answers are still due on this connection."""
        return bool(self._slots)


class _HalfCloseGuard(asyncio.Protocol):
    """aiohttp's protocol for one connection, except that a client who half-closes still gets its answer.

    Why: aiohttp's handler returns None from ``eof_received``, so the transport closes at a
    client's half-close (``shutdown(SHUT_WR)`` right after its request, as ``nc -N`` does) and
    the answer is lost (aiohttp#3659). Here, when a request is owed, the transport stays open and
    aiohttp is told to close the connection once it has answered; a request cut short by the
    half-close is answered 400. Whatever else stays open closes after the keep-alive time."""

    def __init__(self, handler: asyncio.Protocol) -> None:
        self._handler = handler
        self._transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._bodies: list[Any] = []  # request bodies aiohttp is still receiving (its StreamReaders)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        handler: Any = self._handler
        handler.data_received(data)
        # Requests it just framed are still queued here (its task takes them later): note their bodies.
        bodies = [b for b in self._bodies if not b.is_eof()]
        bodies += [b for _, b in getattr(handler, "_messages", ()) if not b.is_eof() and b not in bodies]
        self._bodies = bodies

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def eof_received(self) -> bool | None:
        handler: Any = self._handler
        handler.eof_received()
        if _owes_nothing(handler) or self._transport is None:
            return None  # close now, as aiohttp would
        handler.close()  # aiohttp's: close the connection after answering the requests it has
        # A body still incomplete never will be: its reader fails now (the app answers 400)
        # instead of waiting for bytes that cannot come.
        for body in self._bodies:
            if not body.is_eof():
                body.set_exception(ConnectionResetError("the client closed its side before sending the whole body"))
        self._bodies = []
        self._deadline = asyncio.get_running_loop().call_later(_KEEPALIVE_S, self._transport.close)
        return True


def _owes_nothing(handler: Any) -> bool:
    """True when aiohttp's handler waits for a request and has none: nothing to answer. Reads its
    internals (aiohttp 3.14, checked by tests); without them, True: aiohttp's own behaviour."""
    messages, waiter = getattr(handler, "_messages", None), getattr(handler, "_waiter", None)
    if messages is None:
        return True
    return not messages and waiter is not None and not waiter.done()


class FrontDoor:
    """The listening socket and its connections. Make one with :func:`listen`."""

    def __init__(self, runner: web.AppRunner) -> None:
        state = runner.app[STATE]
        self._gate = state.gate
        self._inference = state.inference
        self._metrics = state.metrics
        self._max_body = state.config.max_body_bytes
        self._read_timeout = state.config.read_timeout_s
        self._aiohttp = _aiohttp_protocols(runner)
        self._connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._date = ""
        self._date_at = 0
        # The end of every response head: headers that never change, then the blank line.
        self._tail = "".join(f"{k}: {v}\r\n" for k, v in self._gate.extra_headers) + "Server: tandem\r\n\r\n"
        self._closing_tail = "Connection: close\r\n" + self._tail  # while the server drains (Gate.draining)
        #: Requests the front door answered itself, and connections it handed to aiohttp.
        self.served = 0
        self.handed_off = 0
        self._served_published = 0
        self._metrics.on_refresh(self._sync_metrics)
        #: Connections dropped because the front door itself failed (a bug; logged with its traceback).
        self.internal_errors = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_at:
            self._date_at, self._date = now, email.utils.formatdate(now, usegmt=True)
        return self._date

    async def _start(self, host: str, port: int, reuse_port: bool, backlog: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_port=reuse_port or None
        )
        self._sweeper = loop.create_task(self._sweep())

    def _sync_metrics(self) -> None:
        """Publish the requests served since the last call: one Counter.inc per scrape instead of
        one per request (~0.4 us of the loop's ~24 us per request). With --workers N, the app's
        periodic metrics refresh runs it too, for the scrapes that reach another worker."""
        new = self.served - self._served_published
        if new:
            self._metrics.front_requests.inc(new)
            self._served_published += new

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(_KEEPALIVE_S, self._read_timeout) / 5)
            now = time.monotonic()
            for conn in list(self._connections):
                conn.expire(now, self._read_timeout)

    async def close(self, timeout: float) -> None:
        """Stop accepting, answer what the front door accepted (up to ``timeout``), close its connections."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        # A connection owed no answer closes now, a half-sent request included (it was never
        # accepted); the others close once their answers are written, or at the deadline.
        deadline = time.monotonic() + timeout
        while any(c.owed for c in self._connections) and time.monotonic() < deadline:
            for conn in [c for c in self._connections if not c.owed]:
                conn.close()
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.close()
        self._sync_metrics()


class _AiohttpOnly:
    """``front_door = false``: aiohttp serves every connection, behind the same interface."""

    def __init__(self, server: asyncio.AbstractServer) -> None:
        self._server = server
        self.served = self.handed_off = 0

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self, timeout: float) -> None:
        self._server.close()  # accepted requests are answered by runner.cleanup()'s shutdown


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


def _aiohttp_protocols(runner: web.AppRunner) -> Callable[[], asyncio.Protocol]:
    """Makes aiohttp's protocol for one connection of the app (with :class:`_RequestHandler`'s errors)."""
    server = runner.server
    if server is None:
        raise RuntimeError("call runner.setup() before listen()")
    try:  # what web.Server.__call__ does, with the subclass
        loop, kwargs = server._loop, server._kwargs  # type: ignore[attr-defined]
    except AttributeError:
        return server
    return lambda: _RequestHandler(server, loop=loop, **kwargs)


async def listen(
    runner: web.AppRunner, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024
) -> FrontDoor | _AiohttpOnly:
    """Serve ``runner``'s app (set up already) on host:port: through the front door, or through
    aiohttp alone when the app's config says ``front_door = false``. Stop with ``await x.close(t)``
    before ``runner.cleanup()``."""
    if not runner.app[STATE].config.front_door:
        aiohttp = _aiohttp_protocols(runner)
        server = await asyncio.get_running_loop().create_server(
            lambda: _HalfCloseGuard(aiohttp()), host, port, backlog=backlog, reuse_port=reuse_port or None
        )
        return _AiohttpOnly(server)
    door = FrontDoor(runner)
    await door._start(host, port, reuse_port, backlog)
    return door
