"""Reading request bodies: size limit and gzip/deflate decoding done by us, not by aiohttp.

aiohttp's own decompression answers a broken deflate stream from inside its HTTP parser, with a
text body and, depending on how the bytes arrive, sometimes not at all (the handler waits on a
payload that never completes). So the app turns it off (``handler_args={"auto_decompress":
False}``) and :func:`read_body` inflates here, with the size limit applied to the inflated bytes
(a small gzip bomb gets 413, not a server full of zeros) and every failure a clear 4xx.

Bytes are read as they arrive, each wait bounded by the server's ``read_timeout_s``: aiohttp has
no such bound once a handler runs, so a client that stops mid-body would hold the handler, its
buffer and the socket until shutdown.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from tandem.shared.errors import InvalidInput, PayloadTooLarge, RequestTimeout

__all__ = ["read_body", "read_raw"]

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


async def read_raw(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body's bytes as received (not decoded), at most ``max_bytes``; 408 when the client
    sends nothing for ``timeout_s`` before the body is complete."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {max_bytes}")
    chunks, size = [], 0
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await request.content.readany()
        except TimeoutError:
            raise RequestTimeout(
                f"the client sent no byte of its request body for {timeout_s:g} s ({size} bytes received)"
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, decoded per Content-Encoding, at most ``max_bytes`` after decoding (and
    before); 408 when the client stalls for ``timeout_s`` mid-body (see :func:`read_raw`)."""
    raw = await read_raw(request, max_bytes, timeout_s)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if not encoding or encoding == "identity":
        return raw
    if encoding not in ("gzip", "deflate"):
        raise _unsupported(encoding)
    if len(raw) > _OFFLOAD_BYTES:
        return await asyncio.to_thread(_inflate, raw, encoding, max_bytes)
    return _inflate(raw, encoding, max_bytes)
