"""The event loop's Python cost per request, measured in-process, without sockets.

The real app (front door, codec, batcher, onnxruntime session) serves 64 fake connections; each
sends its next request the moment its response is written, as wrk's connections do. Prints the
main thread's CPU time per request: what the loop spends outside the kernel, the number to cut
for a small model's throughput (wrk measurements add ~6 us of syscalls per request and noise).

    python bench/loop_cost.py --repository R [--model digits] [--requests 60000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tandem.cloud import front
from tandem.cloud.app import STATE, create_app
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p


class _Transport:
    """Stands in for a socket: a written response makes the connection send its next request."""

    def __init__(self, conn: Any, raw: bytes, loop: asyncio.AbstractEventLoop, count: list[int], done: asyncio.Event, n: int):
        self._conn, self._raw, self._loop, self._count, self._done, self._n = conn, raw, loop, count, done, n

    def write(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"the server answered {data[:200]!r}")
        self._count[0] += 1
        if self._count[0] >= self._n:
            self._done.set()
        else:
            self._loop.call_soon(self._conn.data_received, self._raw)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def _measure(args: argparse.Namespace) -> list[float]:
    config = ServerConfig(repository=Path(args.repository), insecure_skip_signature=True, access_log=False)
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        engine = app[STATE].repository.get(args.model, None).engine
        body = p.InferRequest(engine.example_inputs(1)).to_wire()
        raw = (f"POST {p.infer_path(args.model)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {p.CONTENT_TYPE}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        loop = asyncio.get_running_loop()
        door = front.FrontDoor(runner)
        results = []
        for _ in range(args.runs):
            count, done = [0], asyncio.Event()
            conns = []
            for _ in range(args.connections):
                conn = front._Connection(door)
                conn.connection_made(_Transport(conn, raw, loop, count, done, args.requests))  # type: ignore[arg-type]
                conns.append(conn)
            for conn in conns:
                conn.data_received(raw)
            await asyncio.sleep(0.3)  # warm
            c0, t0, w0 = count[0], time.thread_time(), time.perf_counter()
            await done.wait()
            n = count[0] - c0
            results.append((time.thread_time() - t0) / n * 1e6)
            print(f"  {results[-1]:6.2f} us of loop CPU per request  ({n / (time.perf_counter() - w0):,.0f} req/s)", flush=True)
            await asyncio.sleep(0.2)  # let the last batches finish before the next round
        return results
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", required=True, help="a repository tandem serve can load (signatures are not checked)")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--requests", type=int, default=60000, help="per run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(_measure(args))
    else:
        results = uvloop.run(_measure(args))
    print(f"median {statistics.median(results):.2f} us of loop CPU per request ({args.model}, {args.connections} connections)")


if __name__ == "__main__":
    main()
