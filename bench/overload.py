"""What ``tandem serve`` answers when it is asked too much: a bounded overload run on 127.0.0.1.

One ``tandem serve`` process over a temporary repository of three synthetic models (made with
onnx.helper, as the tests make them), and four measurements:

1. **rows per request**: a request one row over ``max_batch_size`` and what it is answered.
2. **a 20 ms deadline behind a full queue**: the slow model's one instance computes for seconds,
   forty heavy requests wait behind it; how long a one-row request with ``X-Tandem-Deadline-Ms:
   20`` takes to be answered, before the server knows a batch's time (its timer answers it 504)
   and after (refused on arrival, 503 + Retry-After).
3. **admitted latency at ~10x capacity**: the capacity of a model whose batch computes for tens of
   ms is measured first (closed loop); then requests arrive at ten times that rate (open loop,
   up to ``--connections`` at once) for ``--duration`` seconds, once with ``max_queue_wait_ms``
   and once without any bound. Prints admitted p50/p99/max, req/s served, the share shed, and
   whether every 503 carried Retry-After.
4. **RSS before and after a large batch**: the server process's resident memory warm, at the
   peak of one request of ``--large-rows`` rows (``max_request_rows`` raised for that model),
   and once it is answered.

    python bench/overload.py [--duration 5] [--connections 1500] [--queue-wait-ms 200] [--large-rows 40000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support.py, cloud_support.py: real ONNX models and signed bundles

import aiohttp  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cloud_support import make_onnx_bundle, make_slow_onnx, slow_inputs  # noqa: E402
from support import make_keys, save_onnx  # noqa: E402
from tandem.shared.bundle import TensorSpec  # noqa: E402
from tandem.shared.protocol import HEADER_DEADLINE_MS, HEADER_RETRY_AFTER, InferRequest, infer_path  # noqa: E402
from tandem.shared.tensors import unpackb  # noqa: E402

HEAVY = 600  # rounds of the slow model: ~0.1 s of one core per request
BATCH_WORK = 300  # rounds per batch of the overload model: ~50 ms of one core per batch, whatever its size
BUSY_BATCH = 4  # max_batch_size of the overload model


def _wide_onnx(path: Path, hidden: int = 2048) -> Path:
    """x FP32 [batch, 64] -> y FP32 [batch, 10] through a [batch, hidden] activation (8 KB per row)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(rng.standard_normal((64, hidden)).astype(np.float32) / 8, "w1"),
         numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32) / 45, "w2")],
    )
    return save_onnx(graph, path)


def _repository(root: Path, private: Path) -> None:
    slow_specs = (
        [TensorSpec(name="x", datatype="FP32", shape=["batch", 8]), TensorSpec(name="work", datatype="INT64", shape=["batch", 1])],
        [TensorSpec(name="y", datatype="FP32", shape=["batch", 8])],
    )
    for name in ("slow", "busy"):  # slow: one request at a time; busy: small batches for the overload run
        d = root / name / "1"
        d.mkdir(parents=True)
        make_onnx_bundle(d, private, make_slow_onnx(d / "model.onnx"), name, "1", *slow_specs)
    d = root / "wide" / "1"
    d.mkdir(parents=True)
    make_onnx_bundle(
        d, private, _wide_onnx(d / "model.onnx"), "wide", "1",
        [TensorSpec(name="x", datatype="FP32", shape=["batch", 64])], [TensorSpec(name="y", datatype="FP32", shape=["batch", 10])],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> tuple[float, float]:
    """(resident MB now, peak resident MB) of process ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], float, dict[str, str]]:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as r:
        raw = await r.read()
        ms = (time.perf_counter() - t0) * 1e3
        return r.status, (unpackb(raw) if r.status != 200 else {}), ms, dict(r.headers)


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"tandem serve exited with {proc.returncode}")
            try:
                async with session.get(url + "/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("tandem serve did not become ready")


async def row_limit(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        body = InferRequest(slow_inputs(1, rows=BUSY_BATCH + 1)).to_wire()
        status, doc, ms, _ = await _post(session, url + infer_path("busy"), body)
    print(f"1. rows per request: {BUSY_BATCH + 1} rows to a model with max_batch_size {BUSY_BATCH} -> "
          f"{status} {doc.get('code')}: {doc.get('error')}")


async def deadline_behind_a_full_queue(url: str) -> None:
    print("2. a one-row request with a 20 ms deadline behind 40 heavy requests (one instance, batches of 1):")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        heavy = InferRequest(slow_inputs(HEAVY)).to_wire()
        light = InferRequest(slow_inputs(1)).to_wire()
        first = InferRequest(slow_inputs(10 * HEAVY)).to_wire()  # computes ~1 s: no batch time is known meanwhile
        for attempt in ("before any batch time is known", "once a batch time is known"):
            blockers = [asyncio.ensure_future(_post(session, url + infer_path("slow"), first))]
            await asyncio.sleep(0.1)
            blockers += [asyncio.ensure_future(_post(session, url + infer_path("slow"), heavy)) for _ in range(40)]
            await asyncio.sleep(0.2)  # they are queued behind it
            status, doc, ms, headers = await _post(session, url + infer_path("slow"), light, {HEADER_DEADLINE_MS: "20"})
            retry = headers.get(HEADER_RETRY_AFTER)
            queued_s = sum(1 for b in blockers if not b.done())
            print(f"   {attempt}: {status} {doc.get('code')} after {ms:.1f} ms"
                  f"{f', Retry-After {retry} s' if retry else ''} ({queued_s} heavy requests still unanswered)")
            results = await asyncio.gather(*blockers)
            if attempt.startswith("before"):
                total = max(r[2] for r in results) / 1e3
                print(f"   (the 41 heavy requests took {total:.1f} s to answer; before, the 20 ms request waited for them)")


async def _open_loop(url: str, rate: float, duration: float, connections: int) -> dict[str, Any]:
    """Requests at ``rate`` per second for ``duration`` s, each on its own task (up to
    ``connections`` at once); returns the statuses and latencies."""
    body = InferRequest(slow_inputs(BATCH_WORK)).to_wire()
    statuses: list[int] = []
    admitted: list[float] = []
    queued: list[float] = []  # the server's X-Tandem-Queue-Us of each admitted request, in ms
    retry_missing = 0
    sem = asyncio.Semaphore(connections)
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            nonlocal retry_missing
            async with sem:
                try:
                    status, _, ms, headers = await _post(session, url + infer_path("busy"), body)
                except (TimeoutError, aiohttp.ClientError):
                    status, ms, headers = -1, 0.0, {}
            statuses.append(status)
            if status == 200:
                admitted.append(ms)
                queued.append(float(headers["X-Tandem-Queue-Us"]) / 1e3)
            elif status in (429, 503) and HEADER_RETRY_AFTER not in headers:
                retry_missing += 1

        tasks = []
        t0 = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        sent_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        total_s = time.perf_counter() - t0
    return {"sent": n, "sent_s": sent_s, "total_s": total_s, "statuses": statuses, "admitted": admitted, "queued": queued, "retry_missing": retry_missing}


async def _capacity(url: str, seconds: float = 3.0, concurrency: int = 32) -> tuple[float, float]:
    """(req/s, median batch compute ms) of the busy model under a closed loop of ``concurrency``."""
    body = InferRequest(slow_inputs(BATCH_WORK)).to_wire()
    done = 0
    compute_ms: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                status, _, _, headers = await _post(session, url + infer_path("busy"), body)
                done += status == 200
                if status == 200:
                    compute_ms.append(float(headers["X-Tandem-Compute-Us"]) / 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0), statistics.median(compute_ms) if compute_ms else float("nan")


def _report(label: str, r: dict[str, Any]) -> None:
    statuses = r["statuses"]
    ok = r["admitted"]
    shed = sum(1 for s in statuses if s in (429, 503))
    other = sorted({s for s in statuses if s not in (200, 429, 503)})
    print(f"   {label}: {len(ok)} admitted of {r['sent']} sent in {r['sent_s']:.1f} s ({shed / max(1, len(statuses)):.0%} shed"
          f"{', other statuses ' + str(other) if other else ''}); served {len(ok) / r['total_s']:.0f} req/s; admitted latency "
          f"p50 {_percentile(ok, 0.5):.0f} ms, p99 {_percentile(ok, 0.99):.0f} ms, max {max(ok, default=float('nan')):.0f} ms "
          f"(in the server's queue: p99 {_percentile(r['queued'], 0.99):.0f} ms, max {max(r['queued'], default=float('nan')):.0f} ms); "
          f"503 without Retry-After: {r['retry_missing']}")


async def overload(server: Server, duration: float, connections: int, queue_wait_ms: float | None) -> None:
    await _capacity(server.url, seconds=1.0)  # warm
    capacity, batch_ms = await _capacity(server.url)
    rate = 10 * capacity
    if queue_wait_ms is None:
        # The bound must leave room for about two batches (see BatchingConfig.max_queue_wait_ms),
        # and batches compute slower under overload, the cores shared with the load generator.
        queue_wait_ms = float(round(5 * batch_ms, -1))
    await server.restart(queue_wait_ms=queue_wait_ms)
    await _capacity(server.url, seconds=1.0)
    print(f"3. ~10x capacity: the busy model serves {capacity:.0f} req/s (closed loop, 32 connections; batches of {BUSY_BATCH}, "
          f"{batch_ms:.0f} ms of compute each); offered {rate:.0f} req/s for {duration:g} s, up to {connections} connections at once:")
    _report(f"max_queue_wait_ms {queue_wait_ms:g}", await _open_loop(server.url, rate, duration, connections))
    await server.restart(queue_wait_ms=None)
    await _capacity(server.url, seconds=1.0)  # the same warm state as above
    _report("no queue-wait bound", await _open_loop(server.url, rate, duration, connections))


async def large_batch_rss(server: Server, rows: int) -> None:
    async with aiohttp.ClientSession() as session:
        small = InferRequest({"x": np.ones((32, 64), np.float32)}).to_wire()
        for _ in range(20):
            await _post(session, server.url + infer_path("wide"), small)
        before, _ = _rss_mb(server.pid)
        big = InferRequest({"x": np.ones((rows, 64), np.float32)}).to_wire()
        status, doc, ms, _ = await _post(session, server.url + infer_path("wide"), big)
        await asyncio.sleep(0.5)
        after, peak = _rss_mb(server.pid)
        for _ in range(20):
            await _post(session, server.url + infer_path("wide"), small)
        later, _ = _rss_mb(server.pid)
    print(f"4. RSS of the server around one {rows}-row request ({status}, {ms:.0f} ms; max_request_rows raised for it): "
          f"{before:.0f} MB warm, peak {peak:.0f} MB, {after:.0f} MB once answered, {later:.0f} MB after 20 more batches of 32")


class Server:
    def __init__(self, repo: Path, public: Path, work: Path) -> None:
        self.repo, self.public, self.work = repo, public, work
        self.proc: subprocess.Popen[bytes] | None = None
        self.large_rows = 0
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, queue_wait_ms: float | None, large_rows: int) -> None:
        self.large_rows = large_rows
        busy: dict[str, Any] = {"max_batch_size": BUSY_BATCH}
        if queue_wait_ms is not None:
            busy["max_queue_wait_ms"] = queue_wait_ms
        config = {
            "repository": str(self.repo), "port": self.port, "trusted_keys": [str(self.public)], "access_log": False,
            "warmup_batch_sizes": [1, BUSY_BATCH, 32],
            "model_batching": {"slow": {"max_batch_size": 1}, "busy": busy, "wide": {"max_request_rows": large_rows}},
        }
        path = self.work / "config.json"
        path.write_text(json.dumps(config))
        # Starting the server under test, before any load: nothing else runs on this loop yet.
        log = open(self.work / "serve.log", "ab")  # noqa: ASYNC230
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "tandem.shared.cli", "serve", "--config", str(path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        await _wait_ready(self.url, self.proc)

    async def restart(self, queue_wait_ms: float | None) -> None:
        self.stop()
        await self.start(queue_wait_ms, self.large_rows)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of open-loop load per overload run")
    parser.add_argument("--connections", type=int, default=1500, help="most requests in flight at once in the overload run")
    parser.add_argument("--queue-wait-ms", type=float, default=None,
                        help="max_queue_wait_ms of the overload model (default: 5x its batch compute time, measured)")
    parser.add_argument("--large-rows", type=int, default=40_000, help="rows of the large request (the wide model: 8 KB of activation per row)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tandem-overload-") as tmp:
        work = Path(tmp)
        private, public = make_keys(work / "keys")
        _repository(work / "repo", private)
        server = Server(work / "repo", public, work)
        await server.start(None, args.large_rows)
        try:
            print(f"tandem serve pid {server.pid} on {server.url}, {os.cpu_count()} cores")
            await large_batch_rss(server, args.large_rows)  # first: a fresh process, nothing else grew it
            await row_limit(server.url)
            await deadline_behind_a_full_queue(server.url)
            await overload(server, args.duration, args.connections, args.queue_wait_ms)
        finally:
            server.stop()
            log = (work / "serve.log").read_text(errors="replace")
            if "Traceback" in log:
                print("tandem serve logged a traceback:\n" + log[-3000:])


if __name__ == "__main__":
    asyncio.run(main())
