"""The floor: what the load generator, the loopback and the cheapest possible Python responder cost.

An asyncio protocol (on uvloop, as ``tandem serve`` runs) that frames each request by its
Content-Length and answers a fixed 200 at once, computing nothing. ``bench/serve.py`` subtracts
its latency at concurrency 1 (and the raw batch-1 ``session.run`` time) from ``tandem serve``'s to
get the overhead the server itself adds.

    python bench/floor_server.py --port 8100
"""

from __future__ import annotations

import argparse
import asyncio

_BODY = b"\x80"  # an empty msgpack map
_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/msgpack\r\nContent-Length: 1\r\n\r\n" + _BODY


class _Floor(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length :]
            self._transport.write(_RESPONSE)  # type: ignore[attr-defined]
        self._buf = buf


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Floor, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8100)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.port))
    else:
        uvloop.run(_serve(args.port))


if __name__ == "__main__":
    main()
