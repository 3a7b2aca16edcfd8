"""The front door: every connection is framed by llhttp; infer requests are answered here, the rest by aiohttp.

Why: aiohttp spends ~40 µs of Python on every request (request object, router, middleware,
response object), and a full handler path cost ~100 µs here. On two cores that shared the
event loop with onnxruntime, it held ``tandem serve`` to ~38% of the digits CNN's raw
``session.run`` limit at 64 connections. This protocol frames and answers an infer request in
a few microseconds of Python, with no task per request: it queues the call on the model's batcher
and finishes on the future's callback.

How: llhttp (through ``httptools``, the parser uvicorn uses and aiohttp's C parser is built on)
frames every message with strict RFC 9112 rules: conflicting or malformed lengths, bytes that are
not allowed in names or values, obs-fold, bare CR or LF and unknown versions are answered 400 and
the connection closed, and so is a request without exactly one ``Host``. A request is taken here
only if it is *plain*: ``POST`` to ``/v1|v2/models/{m}[/versions/{v}]/infer``, ``HTTP/1.1``, one
``Content-Length`` within ``max_body_bytes``, and no ``Transfer-Encoding``, ``Content-Encoding``,
``Expect``, ``Upgrade``, query string or percent-encoding (and, on v2, no ``Accept-Encoding``
asking for compression). Anything else goes, as its exact bytes and with the rest of the
connection, to aiohttp's own protocol for the same app: the connection changes hands once, at a
message boundary, after the front door has written every response it owes on it. Both stacks
share one policy (:class:`~tandem.cloud.gate.Gate`) and one inference core. Pipelined requests are
answered in order. Set ``front_door = false`` to serve with aiohttp alone.

Limits, on every connection whichever stack serves it: a head must complete within
``head_timeout_s`` of its first byte; a body gets ``read_timeout_s`` of grace and must then keep
``min_body_rate``; an idle connection closes after ``keepalive_timeout_s``; beyond
``max_connections`` a new connection is answered 503 and closed. The front door stops reading a
connection with ``max_requests_in_flight`` requests unanswered, or whose client does not read (the
transport's write buffer above its high-water mark).

Drain (:meth:`FrontDoor.close`): stop accepting; each connection goes on reading until it has
taken every byte that sat in its socket's receive buffer when the drain began (and the message
those bytes start), answers every request it took, marks the last answer ``Connection: close``,
then shuts its side and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import http
import json
import logging
import re
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools
from aiohttp import web

from tandem.shared import protocol as p
from tandem.shared.errors import InvalidInput, RequestTimeout, TandemError, Unavailable

from .app import STATE, aiohttp_protocols
from .body import forget, half_closed
from .core import Core
from .inference import header_lines
from .native import NATIVE
from .v2 import V2
from .wire import Wire, start

__all__ = ["FrontDoor", "listen"]

_log = logging.getLogger("tandem.cloud")

#: Largest request line or header field, as aiohttp's limits; and the largest head in all.
_MAX_FIELD = 8190
_MAX_HEAD = 64 * 1024
#: Seconds an answered connection that is closing keeps reading (and dropping) what the client
#: still sends, so that closing does not reset the connection before the client read its answer.
_LINGER_S = 2.0
#: Seconds a connection that owes nothing at the start of a drain waits for a request already on
#: its way (a busy client sends its next request within this); the answer to it closes.
_DRAIN_IDLE_S = 0.5
_INFER = re.compile(rb"/(v1|v2)/models/([^/?#%]+)(?:/versions/([^/?#%]+))?/infer")
_WIRES: dict[bytes, Wire] = {b"v1": NATIVE, b"v2": V2}
#: What the front door does with a request header (any other is checked by llhttp, then ignored):
#: keep its value, count it, take the length, send the message to aiohttp for its presence alone,
#: or look at its value.
_KEEP, _HOST, _LENGTH, _NOT_PLAIN, _ENCODING, _ACCEPT, _PREFER = (object() for _ in range(7))
_HEADERS: dict[bytes, object] = {
    **dict.fromkeys((b"x-request-id", b"authorization", b"x-tandem-deadline-ms"), _KEEP),
    **dict.fromkeys((w.option_header.lower().encode() for w in _WIRES.values()), _KEEP),
    **dict.fromkeys((b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"), _NOT_PLAIN),
    b"host": _HOST, b"content-length": _LENGTH, b"content-encoding": _ENCODING, b"accept-encoding": _ACCEPT,
    b"prefer": _PREFER,  # Prefer: respond-async submits a job: aiohttp's job middleware takes it
}
#: Routes of infer targets seen (target -> protocol, model, version, path), at most this many.
_MAX_ROUTES = 4096
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
#: Errors a decoder raises for input it cannot take (the app's middleware answers them 400 too).
_MALFORMED = (ValueError, TypeError, KeyError, RecursionError)


class _HandOff(Exception):
    """Raised from a parser callback: the message is not one the front door takes."""


class _Stop(Exception):
    """Raised from a parser callback: nothing after this message is read (drain, Connection: close)."""


class _Reject(Exception):
    """Raised from a parser callback: answer 400 and close."""


@dataclass(slots=True)
class _Slot:
    """One request's place in its connection's response order."""

    rid: str
    path: str
    start: float
    head: str | None = None  # the response's status line and headers but the last, once ready
    body: bytes = b""
    status: int = 0
    served: Any = None


def _pending_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the socket's receive buffer (0 when that cannot be told)."""
    sock = transport.get_extra_info("socket")
    try:
        out = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, AttributeError, ValueError):
        return 0
    return int(struct.unpack("i", out)[0])


class _Connection(asyncio.Protocol):
    """One client connection framed by llhttp; infer requests answered from the batch's callback."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._buf: bytes | bytearray = b""  # bytes from the start of the message being framed
        self._pos = 0  # where the next message starts in _buf (only inside data_received)
        self._seen = 0  # bytes received on the connection
        self._now = time.monotonic()  # when the current chunk arrived
        self.last_active = self._now
        self._slots: deque[_Slot] = deque()
        self._handoff = False
        self._paused = False
        self._write_paused = False
        self._stopped = False  # reads nothing more: the last slot's answer closes the connection
        self._lingering = False
        self._eof = False
        self._drain_at: int | None = None  # drain: the stream offset every byte before which is served
        self._drain_seen = 0
        self._remote: str | None = None
        # The message being framed:
        self._head_at: float | None = None  # when its first byte came; None between messages
        self._body_at: float | None = None  # when its head completed
        self._url = b""
        self._hosts = 0
        self._length: int | None = None
        self._headers: dict[bytes, bytes] = {}
        self._veto = False
        self._compress = False  # the client accepts a compressed answer
        self._route: _Route | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        if self._door._admit(transport):
            self._door._connections.add(self)
        else:
            self._stopped = self._lingering = True  # the door answered 503 and closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._door._connections.discard(self)
        self._transport = None
        self._slots.clear()  # their calls still finish (accepted work is done); nobody to tell

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._lingering:
            return None
        if self._handoff:
            return True  # aiohttp is told once it has the connection
        # A message left half-sent never completes; answers still owed are written, then close.
        self._stop()
        return True if self._slots else None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        self._now = self.last_active = time.monotonic()
        self._seen += len(data)
        if self._stopped or self._handoff:
            if self._handoff and not self._stopped:
                self._buf = bytes(self._buf) + data  # for aiohttp, once our answers are out
            return  # a closing connection drops what the client still sends
        if self._buf:
            if isinstance(self._buf, bytes):
                self._buf = bytearray(self._buf)
            self._buf += data
        else:
            self._buf = data
        self._pos = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _HandOff):
                self._start_handoff()
                return
            if isinstance(cause, _Reject):
                self._reject(str(cause))
            elif not isinstance(cause, _Stop):
                self._internal_error(cause)
                return
        except httptools.HttpParserError as e:
            self._reject(" ".join(str(e).split()) or type(e).__name__)
        except Exception as e:  # noqa: BLE001 - a bug here must not take down the loop's other connections
            self._internal_error(e)
            return
        if self._stopped:
            self._buf = b""
        else:
            buf, pos = self._buf, self._pos
            if pos:  # (a body arriving over many reads is not copied at each)
                self._buf = buf[pos:] if pos < len(buf) else b""
            if self._head_at is not None and self._body_at is None and len(self._buf) > _MAX_HEAD:
                self._reject(f"request head larger than {_MAX_HEAD} bytes")
        self._update_reading()

    # --- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head_at = self._now
        self._body_at = None
        self._url = b""
        self._hosts = 0
        self._length = None
        self._headers = {}
        self._veto = self._compress = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > _MAX_FIELD:
            raise _Reject(f"request target longer than {_MAX_FIELD} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > _MAX_FIELD:
            raise _Reject(f"header field longer than {_MAX_FIELD} bytes")
        key = name.lower()
        kind = _HEADERS.get(key)
        if kind is None:
            return  # checked by llhttp, not read here
        if kind is _KEEP:
            self._headers.setdefault(key, value)
        elif kind is _HOST:
            self._hosts += 1
        elif kind is _LENGTH:
            self._length = int(value)  # llhttp accepts digits only, and one Content-Length
        elif kind is _NOT_PLAIN:
            self._veto = True
        elif kind is _ENCODING:
            self._veto |= value.strip(b" \t").lower() != b"identity"
        elif kind is _PREFER:
            self._veto |= b"respond-async" in value.lower()
        else:  # Accept-Encoding
            v = value.lower()
            self._compress |= b"gzip" in v or b"deflate" in v

    def on_headers_complete(self) -> None:
        self._body_at = self._now
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(f"HTTP/{version} is not supported")  # llhttp takes 0.9 and 2.0 heads
        if self._hosts != 1 and version == "1.1":
            raise _Reject("an HTTP/1.1 request needs exactly one Host header" if self._hosts else "Host header missing")
        route = _route(self._door._routes, self._url)
        if (
            self._veto or route is None or (self._compress and route[0].compresses)  # aiohttp compresses those
            or self._length is None or self._length > self._door._max_body or version != "1.1" or parser.get_method() != b"POST"
        ):
            raise _HandOff
        self._route = route

    def on_message_complete(self) -> None:
        # The message is Content-Length framed and llhttp accepted it: its head ends at the first
        # blank line after any empty lines before the request line, and its body follows.
        buf, pos = self._buf, self._pos
        while buf[pos] in (13, 10):
            pos += 1
        start = buf.find(b"\r\n\r\n", pos) + 4
        stop = start + (self._length or 0)
        if start < 4 or stop > len(buf):
            raise RuntimeError("the framed message does not fit the bytes received")
        body = memoryview(buf)[start:stop] if isinstance(buf, bytes) else bytes(buf[start:stop])
        self._pos = stop
        self._head_at = None
        last = not self._parser.should_keep_alive() or self._door._gate.draining or (
            self._drain_at is not None and self._seen - len(buf) + stop >= self._drain_at
        )
        self._serve(self._route, body)  # type: ignore[arg-type]
        if last:
            self._stop()
            raise _Stop

    # --- serving ----------------------------------------------------------------------------------

    def _serve(self, route: _Route, body: Any) -> None:
        door = self._door
        gate, inference = door._gate, door._inference
        h = self._headers
        wire, option, model, version_s, path = route
        rid = h.get(b"x-request-id")
        slot = _Slot(gate.request_id(rid.decode("latin-1") if rid is not None else None), path, time.perf_counter())
        self._slots.append(slot)
        door.served += 1  # published by FrontDoor._sync_metrics, not counted here (hot path)
        deadline = _text(h.get(b"x-tandem-deadline-ms"))
        try:
            gate.check_auth(path, _text(h.get(b"authorization")))
            call, req = start(wire, inference, model, version_s, body, _text(h.get(option)), deadline)
        except Exception as e:  # noqa: BLE001 - one broken request must not take the server down
            if isinstance(e, _MALFORMED):  # as the app's middleware: e.g. a JSON integer over 4300 digits
                e = InvalidInput(f"malformed request: {e}")
            elif not isinstance(e, TandemError):
                _log.exception("unhandled error on POST %s", path)
                e = TandemError(f"internal error: {type(e).__name__}")
            # Only a refused request needs the model looked up here (for its error headers and log).
            with contextlib.suppress(TandemError):
                slot.served = inference.resolve(model, version_s)
            self._fail(slot, e)
            return
        slot.served = call.served
        if call.future is None or call.future.done():
            self._finish(slot, wire, call, req)
        else:
            call.future.add_done_callback(lambda _f: self._finish(slot, wire, call, req))

    def _finish(self, slot: _Slot, wire: Wire, call: Any, req: Any) -> None:
        inference = self._door._inference
        try:
            try:
                outcome = inference.finish(call)
            except asyncio.CancelledError:
                raise Unavailable("the request was cancelled before it ran (model unloading)") from None
            slot.served = outcome.model
            head, body = wire.reply(inference, outcome, req, slot.rid)
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
        """Queue a response; ``head`` holds its own header lines, each ending in CRLF. The last
        lines (and whether they close the connection) are written when it goes out."""
        slot.head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n{head}{p.HEADER_REQUEST_ID}: {slot.rid}\r\n"
            f"Content-Length: {len(body)}\r\nDate: {self._door.date()}\r\n"
        )
        slot.body = body
        slot.status = status
        self._flush()

    def _flush(self) -> None:
        """Write every ready response at the head of the order, then hand off or close if due."""
        door = self._door
        gate = door._gate
        slots, transport = self._slots, self._transport
        log = gate.logs_access
        if gate.draining and not self._stopped:
            self._stop()  # the shutdown delay: every answer closes its connection
        while slots and slots[0].head is not None:
            slot = slots.popleft()
            if transport is not None and not transport.is_closing():
                closes = self._stopped and not slots
                transport.write((slot.head + (door._closing_tail if closes else door._tail)).encode() + slot.body)  # type: ignore[operator]
            if log:
                ms = (time.perf_counter() - slot.start) * 1e3
                gate.log_access(slot.rid, "POST", slot.path, slot.status, ms, slot.served, self._remote)
        if not slots and transport is not None:
            if self._stopped:
                self._linger()
            elif self._handoff:
                self._hand_off()
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._lingering:
            return
        pause = self._write_paused or self._stopped or self._handoff or len(self._slots) >= self._door._max_in_flight
        if pause != self._paused:
            self._paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _stop(self) -> None:
        """Read no more: answer what was taken, the last answer says ``Connection: close``."""
        self._stopped = True
        self._head_at = None
        self._buf = b""
        if not self._slots:
            self._linger()

    def _linger(self) -> None:
        """Close gracefully: shut our side, then drop what the client still sends for a while
        (closing with unread bytes would reset the connection and could destroy the answers in
        flight), and close when the client does or at the end of the grace."""
        transport = self._transport
        if transport is None or self._lingering or self._slots:
            return
        self._stopped = self._lingering = True
        if self._eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def _reject(self, reason: str) -> None:
        """Answer a message llhttp (or a limit) refuses with 400 after the answers owed, and close."""
        _log.info("malformed HTTP request from %s: %s", self._remote, reason)
        self._answer_and_close(InvalidInput(f"malformed HTTP request: {reason}"), self._url.decode("latin-1") or "/", json_body=True)

    def _answer_and_close(self, error: TandemError, path: str, json_body: bool = False) -> None:
        self._buf = b""
        self._stopped = True
        self._head_at = None
        slot = _Slot(self._door._gate.request_id(None), path, time.perf_counter())
        self._slots.append(slot)
        if json_body:
            self._ready(slot, error.status, "Content-Type: application/json\r\n", json.dumps(error.to_dict()).encode())
        else:
            status, headers, body = self._door._gate.error_reply(error, path, None)
            self._ready(slot, status, header_lines(headers), body)

    def _internal_error(self, e: BaseException | None) -> None:
        _log.error("front door: dropping a connection after an internal error", exc_info=e)
        self._door.internal_errors += 1
        self._door._metrics.front_errors.inc()
        self.close()

    def _start_handoff(self) -> None:
        """The message at ``_pos`` goes to aiohttp, with everything after it, once our answers are out."""
        self._handoff = True
        self._buf = self._buf[self._pos :]
        self._head_at = None
        if not self._slots:
            self._hand_off()
        else:
            self._update_reading()

    def _hand_off(self) -> None:
        """Give the connection to aiohttp, with the bytes from the first request it must answer."""
        transport = self._transport
        if transport is None:
            return
        data, self._buf = bytes(self._buf), b""
        door = self._door
        door.handed_off += 1
        door._metrics.front_handoffs.inc()
        door._connections.discard(self)
        handler = _AiohttpConnection(door, door._aiohttp())
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

    # --- timers and drain (the door's sweeper and close call these) ------------------------------

    def expire(self, now: float) -> None:
        """Enforce the head deadline, the body rate and the keep-alive time."""
        door = self._door
        if self._lingering or self._handoff:
            return
        if self._head_at is not None and not self._stopped:
            if self._body_at is None:
                if now - self._head_at > door._head_timeout:
                    self._time_out(f"the request head was not complete {door._head_timeout:g} s after its first byte")
            elif now - self._body_at > door._read_timeout + len(self._buf) / door._min_rate:
                self._time_out(f"the request body arrived slower than {door._min_rate} bytes/s ({len(self._buf)} bytes received)")
        elif self._slots:
            if self._write_paused and now - self.last_active > door._keepalive:
                self.close()  # answers owed to a client that reads none of them
        elif self._drain_at is None and now - self.last_active > door._keepalive:
            self.close()

    def _time_out(self, reason: str) -> None:
        door = self._door
        door.timed_out += 1
        self._answer_and_close(RequestTimeout(reason), self._url.decode("latin-1") or "/")

    def drain(self) -> None:
        """Serve what the client sent before now (in our buffer and the socket's), close after it."""
        if self._transport is None or self._lingering or self._handoff:
            return
        self._drain_at = self._seen + _pending_bytes(self._transport)
        if self._stopped:
            return
        if self._drain_at == self._seen and not self._buf and self._slots:
            self._stop()  # nothing more was sent: the answer owed last closes
            return
        # Bytes still to come in (the socket's, or the rest of a half-read message), or nothing
        # owed: wait for them while they keep coming (on_message_complete stops at the first
        # message ending past the socket's bytes); a client that sends nothing for a while has
        # sent all it will before the drain.
        self._drain_seen = self._seen
        asyncio.get_running_loop().call_later(_DRAIN_IDLE_S, self._drain_quiet)

    def _drain_quiet(self) -> None:
        if self._stopped or self._transport is None:
            return
        if self._seen > self._drain_seen:
            self._drain_seen = self._seen
            asyncio.get_running_loop().call_later(_DRAIN_IDLE_S, self._drain_quiet)
        else:
            self._stop()  # a message left half-sent was never accepted: dropped

    @property
    def owed(self) -> bool:
        """The connection still has answers or a drain to finish."""
        return bool(self._slots) or (self._drain_at is not None and not self._stopped)


#: (wire protocol, its option header's name in lower case, model, version, path)
_Route = tuple[Wire, bytes, str, "str | None", str]


def _route(routes: dict[bytes, _Route | None], target: bytes) -> _Route | None:
    """The :data:`_Route` of an infer target, None for any other; remembered."""
    try:
        return routes[target]
    except KeyError:
        pass
    match = _INFER.fullmatch(target)
    route = None
    if match is not None:
        version = match.group(3)
        wire = _WIRES[match.group(1)]
        route = (
            wire, wire.option_header.lower().encode(), match.group(2).decode(),
            version.decode() if version is not None else None, target.decode(),
        )
    if len(routes) >= _MAX_ROUTES:
        routes.clear()
    routes[target] = route
    return route


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1").strip(" \t") if value is not None else None


class _Watch:
    """Watches the bytes a connection served by aiohttp sends, with its own llhttp parser, for the
    limits aiohttp does not apply itself: the head deadline and the body rate of every request."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.head_at: float | None = None
        self.body_at: float | None = None
        self.body = 0  # bytes of the body received
        self.messages = 0
        self.now = 0.0

    def feed(self, data: bytes, now: float) -> None:
        if self.parser is None:
            return
        self.now = now
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.parser = None  # aiohttp answers (or takes the connection); nothing more to time

    def on_message_begin(self) -> None:
        self.head_at, self.body_at, self.body = self.now, None, 0

    def on_headers_complete(self) -> None:
        self.body_at = self.now

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.head_at = self.body_at = None
        self.messages += 1


class _AiohttpConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the limits of every connection, and an answer
    for a client that half-closes.

    Why: aiohttp applies no deadline to a request head nor a rate to a body nobody reads yet, and
    its handler returns None from ``eof_received``, so the transport closes at a client's
    half-close (``shutdown(SHUT_WR)`` right after its request, as ``nc -N`` does) and the answer
    is lost (aiohttp#3659). Here, at a half-close the transport stays open until the last answer
    owed (the app's middleware marks it ``Connection: close``, see body.py); a request body cut
    short by the half-close fails its reader at once (the app answers 400)."""

    def __init__(self, door: FrontDoor, handler: asyncio.Protocol, *, fresh: bool = False) -> None:
        self._door = door
        self._fresh = fresh  # a new connection (not one the front door hands over): counts against the cap
        self._handler = handler
        self._transport: asyncio.BaseTransport | None = None
        self._watch = _Watch()
        self.last_active = time.monotonic()
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._fresh and not self._door._admit(transport):
            return
        self._transport = transport
        self._handler.connection_made(transport)
        self._door._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._door._connections.discard(self)
        if self._transport is not None:
            self._handler.connection_lost(exc)
            forget(self._transport)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return  # refused
        self.last_active = now = time.monotonic()
        self._watch.feed(data, now)
        self._handler.data_received(data)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def eof_received(self) -> bool | None:
        self._eof = True
        transport, watch = self._transport, self._watch
        if transport is None or watch.parser is None:
            return None  # refused, or aiohttp answers a malformed message and closes
        # The request whose head is complete is aiohttp's too (its body reader now fails: 400).
        if half_closed(transport, watch.messages + (watch.body_at is not None)):
            return None  # nothing owed: close now, as aiohttp would
        return True  # the last answer owed closes the connection

    def expire(self, now: float) -> None:
        door, watch = self._door, self._watch
        if self._transport is None or self._eof:
            return
        if watch.head_at is not None:
            if watch.body_at is None:
                late = now - watch.head_at > door._head_timeout
            else:
                # A second more than the app's own reader allows, so that its 408 goes out first.
                late = now - watch.body_at > door._read_timeout + 1 + watch.body / door._min_rate
            if late:
                door.timed_out += 1
                self._transport.close()
        elif watch.messages == 0 and now - self.last_active > door._keepalive:
            self._transport.close()  # never sent a request (aiohttp times out only after one)

    def drain(self) -> None:
        """aiohttp's own shutdown (runner.cleanup) answers the request in hand and closes."""

    @property
    def owed(self) -> bool:
        return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class FrontDoor:
    """The listening socket and its connections. Make one with :func:`listen`."""

    def __init__(self, runner: web.AppRunner) -> None:
        core: Core = runner.app[STATE]  # the app's state is the server's core
        config = core.config
        self._gate = core.gate
        self._inference = core.inference
        self._metrics = core.metrics
        self.fast = config.front_door
        self._max_body = config.max_body_bytes
        self._head_timeout = config.head_timeout_s
        self._read_timeout = config.read_timeout_s
        self._min_rate = config.min_body_rate
        self._keepalive = config.keepalive_timeout_s
        self._max_connections = config.max_connections
        self._max_in_flight = config.max_requests_in_flight
        self._aiohttp = aiohttp_protocols(runner)
        self._connections: set[_Connection | _AiohttpConnection] = set()
        self._routes: dict[bytes, _Route | None] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._date = ""
        self._date_at = 0
        # The end of every response head: headers that never change, then the blank line.
        self._tail = "".join(f"{k}: {v}\r\n" for k, v in self._gate.extra_headers) + "Server: tandem\r\n\r\n"
        self._closing_tail = "Connection: close\r\n" + self._tail
        refused = Unavailable("too many open connections; retry later")
        self._refusal = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Content-Length: {len(json.dumps(refused.to_dict()))}\r\nConnection: close\r\n\r\n{json.dumps(refused.to_dict())}"
        ).encode()
        #: Requests the front door answered itself, connections it handed to aiohttp, connections
        #: refused beyond max_connections, and requests cut by the head deadline or body rate.
        self.served = 0
        self.handed_off = 0
        self.refused = 0
        self.timed_out = 0
        self._served_published = 0
        self._metrics.on_refresh(self._sync_metrics)
        #: Connections dropped because the front door itself failed (a bug; logged with its traceback).
        self.internal_errors = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def connections(self) -> int:
        return len(self._connections)

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_at:
            self._date_at, self._date = now, email.utils.formatdate(now, usegmt=True)
        return self._date

    def _protocol(self) -> asyncio.Protocol:
        if self.fast:
            return _Connection(self)
        return _AiohttpConnection(self, self._aiohttp(), fresh=True)

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """Whether a new connection is taken; else it is answered 503 (or, draining, closed)."""
        if self._closing:
            transport.close()  # accepted just before the door closed: nothing was asked yet
            return False
        if len(self._connections) < self._max_connections:
            return True
        self.refused += 1
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._refusal)
        if transport.can_write_eof():
            transport.write_eof()  # and let the client close, so that the answer is not reset
            asyncio.get_running_loop().call_later(_LINGER_S, transport.close)
        else:
            transport.close()
        return False

    async def _start(self, host: str, port: int, reuse_port: bool, backlog: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, backlog=backlog, reuse_port=reuse_port or None)
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
        period = min(1.0, self._head_timeout / 4, self._read_timeout / 4, self._keepalive / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self._connections):
                conn.expire(now)

    async def close(self, timeout: float) -> None:
        """Stop accepting; answer every request received, and those whose bytes were in the socket
        buffers when the drain began (up to ``timeout``); close the front door's connections."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.drain()
        deadline = time.monotonic() + timeout
        while any(c.owed for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Linger-closing ones close themselves; anything still open now ran out of time.
        await asyncio.sleep(0)
        for conn in list(self._connections):
            if isinstance(conn, _Connection) and not conn._lingering:
                conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._sync_metrics()


async def listen(runner: web.AppRunner, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> FrontDoor:
    """Serve ``runner``'s app (set up already) on host:port: through the front door, or through
    aiohttp alone when the app's config says ``front_door = false``. Stop with ``await x.close(t)``
    before ``runner.cleanup()``."""
    door = FrontDoor(runner)
    await door._start(host, port, reuse_port, backlog)
    return door
