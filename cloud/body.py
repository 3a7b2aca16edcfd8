"""Reading request bodies: size limit and gzip/deflate decoding done by us, not by aiohttp.

aiohttp's own decompression answers a broken deflate stream from inside its HTTP parser, with a
text body and, depending on how the bytes arrive, sometimes not at all (the handler waits on a
payload that never completes). So the app turns it off (``handler_args={"auto_decompress":
False}``) and :func:`read_body` inflates here, with the size limit applied to the inflated bytes
(a small gzip bomb gets 413, not a server full of zeros) and every failure a clear 4xx.

Bytes are read as they arrive, within the server's bound on a body's total time (``read_timeout_s``
of grace, then ``min_body_rate`` on average): aiohttp has no such bound once a handler runs, so a
client that stops mid-body, or trickles it a byte at a time, would hold the handler, its buffer and
the socket until shutdown.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from aiohttp import web

from tandem.shared.errors import InvalidInput, PayloadTooLarge, RequestTimeout

__all__ = ["read_body", "read_raw", "half_closed", "responded", "forget", "MIN_RATE_KEY"]

#: The app's ``min_body_rate`` (bytes/s a body must keep after its grace); set by create_app.
MIN_RATE_KEY = web.AppKey("tandem_min_body_rate", int)
_DEFAULT_MIN_RATE = 64 * 1024

_OFFLOAD_BYTES = 256 * 1024  # inflate bigger bodies in a thread so the event loop keeps serving


def _unsupported(encoding: str) -> InvalidInput:
    err = InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    err.status = 415
    err.code = "unsupported_encoding"
    return err


def _inflate(raw: bytes, encoding: str, max_bytes: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    try:
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(raw, max_bytes + 1)
        except zlib.error:
            if encoding != "deflate":
                raise
            d = zlib.decompressobj(-zlib.MAX_WBITS)  # some clients send raw deflate without the zlib header
            out = d.decompress(raw, max_bytes + 1)
    except zlib.error as e:
        raise InvalidInput(f"request body is not valid {encoding} data: {e}") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise PayloadTooLarge(f"request body too large: more than {max_bytes} bytes once decompressed")
    if not d.eof:
        raise InvalidInput(f"request body is truncated {encoding} data")
    if d.unused_data:
        raise InvalidInput(f"request body has {len(d.unused_data)} bytes after the end of the {encoding} data")
    return out


class _Peer:
    """What the app knows of one connection aiohttp serves: the bodies being read on it, the
    responses it gave, and, once the client half-closed, how many responses are owed in all."""

    __slots__ = ("readers", "responses", "owed")

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.responses = 0
        self.owed: int | None = None


_peers: dict[object, _Peer] = {}


def half_closed(transport: object, owed: int) -> bool:
    """The client of ``transport`` will send nothing more, and ``owed`` requests were received on it
    in all. A body still incomplete fails now (the app answers 400) instead of waiting for bytes
    that cannot come; the last answer owed closes the connection. True when none is owed any more."""
    peer = _peers.setdefault(transport, _Peer())
    peer.owed = owed
    for content in peer.readers:
        _cut(content)
    return peer.responses >= owed


def responded(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """The app answers ``request`` (its middleware calls this for every answer)."""
    peer = _peers.setdefault(request.transport, _Peer())
    peer.responses += 1
    if peer.owed is not None:
        if not request.content.is_eof():
            request.content.feed_eof()  # the rest cannot come: aiohttp must not wait for it
        if peer.responses >= peer.owed:
            response.force_close()


def forget(transport: object) -> None:
    """``transport`` closed."""
    _peers.pop(transport, None)


def _cut(content: Any) -> None:
    if not content.is_eof():
        content.set_exception(ConnectionResetError("the client closed its side before sending the whole body"))


async def read_raw(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body's bytes as received (not decoded), at most ``max_bytes``; 408 when the body has
    not arrived ``timeout_s`` plus its size at ``min_body_rate`` after reading began."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {max_bytes}")
    rate = request.config_dict.get(MIN_RATE_KEY, _DEFAULT_MIN_RATE)
    content = request.content
    peer = _peers.setdefault(request.transport, _Peer())
    peer.readers.add(content)
    if peer.owed is not None:
        _cut(content)
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                async with asyncio.timeout_at(start + timeout_s + size / rate):
                    chunk = await content.readany()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body arrived slower than {rate} bytes/s after {timeout_s:g} s ({size} bytes received)"
                ) from None
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    finally:
        peer.readers.discard(content)


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, decoded per Content-Encoding, at most ``max_bytes`` after decoding (and
    before); 408 when the body falls behind (see :func:`read_raw`)."""
    raw = await read_raw(request, max_bytes, timeout_s)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if not encoding or encoding == "identity":
        return raw
    if encoding not in ("gzip", "deflate"):
        raise _unsupported(encoding)
    if len(raw) > _OFFLOAD_BYTES:
        return await asyncio.to_thread(_inflate, raw, encoding, max_bytes)
    return _inflate(raw, encoding, max_bytes)
