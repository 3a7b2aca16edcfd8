"""The event loop's Python cost per request, measured in-process, without sockets.

The real app (front door, codec, batcher, onnxruntime session) serves 64 fake connections; each
sends its next request the moment its response is written, as wrk's connections do. Prints the
main thread's CPU time per request: what the loop spends outside the kernel, the number to cut
for a small model's throughput (wrk measurements add ~6 us of syscalls per request and noise).

``--protocol v2`` sends Open Inference Protocol v2 requests with binary tensors (and asks for
binary outputs), as tritonclient does. ``--against DIR`` measures another checkout of Tandem (a
``git worktree`` of an older commit) side by side: each run is a fresh process, alternating
between this checkout and DIR, and the medians of both and their ratio are printed.

    python bench/loop_cost.py --repository R [--model digits] [--protocol native|v2]
                              [--requests 60000] [--runs 3] [--against DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tandem.cloud import front
from tandem.cloud.app import STATE, create_app
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p
from tandem.shared.tensors import datatype_of


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
        raw = _request(args, app[STATE].repository.get(args.model, None).engine.example_inputs(1))
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


def _request(args: argparse.Namespace, inputs: dict[str, Any]) -> bytes:
    """The bytes of one infer request in the protocol asked for."""
    if args.protocol == "native":
        body = p.InferRequest(inputs).to_wire()
        head = f"POST {p.infer_path(args.model)} HTTP/1.1\r\nContent-Type: {p.CONTENT_TYPE}\r\n"
    else:
        tensors = [{"name": k, "shape": list(a.shape), "datatype": datatype_of(a.dtype),
                    "parameters": {"binary_data_size": a.nbytes}} for k, a in inputs.items()]
        header = json.dumps({"inputs": tensors, "parameters": {"binary_data_output": True}}).encode()
        body = header + b"".join(a.tobytes() for a in inputs.values())
        head = f"POST /v2/models/{args.model}/infer HTTP/1.1\r\nInference-Header-Content-Length: {len(header)}\r\n"
    return f"{head}Host: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def _side_by_side(args: argparse.Namespace) -> None:
    """Alternate single-run processes of this checkout and of ``--against``; print both medians."""
    from checkout import checkout_env

    with tempfile.TemporaryDirectory(prefix="loop-cost-") as tmp:
        envs = {"this": None, str(args.against): checkout_env(args.against, Path(tmp))}
        child = [sys.executable, __file__, "--repository", args.repository, "--model", args.model, "--protocol", args.protocol,
                 "--requests", str(args.requests), "--connections", str(args.connections), "--runs", "1"]
        results: dict[str, list[float]] = {label: [] for label in envs}
        for i in range(args.runs):
            for label, env in envs.items():
                out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
                results[label].append(float(out.rsplit("median ", 1)[1].split()[0]))
                print(f"  run {i + 1} {label}: {results[label][-1]:.2f} us", flush=True)
    (this, this_runs), (other, other_runs) = results.items()
    a, b = statistics.median(this_runs), statistics.median(other_runs)
    print(f"median {a:.2f} us (this checkout) vs {b:.2f} us ({other}): {100 * (a / b - 1):+.1f}% "
          f"({args.model}, {args.protocol}, {args.connections} connections, {args.runs} runs each)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", required=True, help="a repository tandem serve can load (signatures are not checked)")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--requests", type=int, default=60000, help="per run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--protocol", choices=("native", "v2"), default="native")
    ap.add_argument("--against", type=Path, default=None, metavar="DIR", help="another checkout, measured side by side")
    args = ap.parse_args()
    if args.against is not None:
        _side_by_side(args)
        return
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(_measure(args))
    else:
        results = uvloop.run(_measure(args))
    print(f"median {statistics.median(results):.2f} us of loop CPU per request "
          f"({args.model}, {args.protocol}, {args.connections} connections)")


if __name__ == "__main__":
    main()
