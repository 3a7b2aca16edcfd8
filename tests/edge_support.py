"""Support for the edge/router tests: a cloud process that can be SIGKILLed, and free ports.

``start_cloud`` runs the real ``tandem serve`` when the cloud tier is installed; until then (and as a
fallback, reported in the test output) it runs the small stand-in below, which speaks the same
native protocol (msgpack infer, timing headers, readiness) from the same repository layout. Run
``python tests/edge_support.py --repository DIR --port P`` to start the stand-in by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_server_available() -> bool:
    return importlib.util.find_spec("tandem.cloud.cli") is not None and importlib.util.find_spec("tandem.cloud.app") is not None


class CloudProcess:
    """A cloud server in a subprocess on 127.0.0.1:port (kill() is SIGKILL, start() restarts it)."""

    def __init__(self, repository: Path, public_key: Path, port: int | None = None) -> None:
        self.repository = repository
        self.public_key = public_key
        self.port = port or free_port()
        self.real = real_server_available()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = repository.parent / f"cloud-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "CloudProcess":
        if self.real:
            cmd = [sys.executable, "-m", "tandem.shared.cli", "serve", "--repository", str(self.repository),
                   "--host", "127.0.0.1", "--port", str(self.port), "--trusted-key", str(self.public_key),
                   "--instances", "1"]
        else:
            cmd = [sys.executable, str(HERE / "edge_support.py"), "--repository", str(self.repository), "--port", str(self.port)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, stdout=open(self._log, "ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cloud exited with {self.proc.returncode}: {self._log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"cloud not ready within {timeout_s} s: {self._log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class SchedulerLag:
    """Measures how late a sleeping thread wakes up (OS starvation + GIL), in ms.

    Deadline assertions allow for this: on a shared 2-core CI box another job can starve the test
    process for hundreds of ms, which no client code can prevent. A client that blocked by itself
    would still fail, since the lag of an idle thread does not grow because of it.
    """

    def __init__(self, period_s: float = 0.005) -> None:
        import threading

        self.max_ms = 0.0
        self._period = period_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self._period)
            self.max_ms = max(self.max_ms, (time.perf_counter() - t0 - self._period) * 1000)

    def __enter__(self) -> "SchedulerLag":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(1)


class LoopLag:
    """How late the running event loop wakes a sleeping task (ms): CPU starvation of the test
    process shows here even when an idle thread wakes on time. A client that ignored its deadline
    (waiting on a stalled cloud) does not raise it, so deadline tests allowing for it still fail then.
    """

    def __init__(self, period_s: float = 0.005) -> None:
        self.max_ms = 0.0
        self._period = period_s
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self._period)
            self.max_ms = max(self.max_ms, (time.perf_counter() - t0 - self._period) * 1000)

    async def __aenter__(self) -> "LoopLag":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# --- the stand-in server ---------------------------------------------------------------------------


def _standin_app(repository: Path):  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort
    from aiohttp import web

    from tandem.shared.bundle import load_bundle
    from tandem.shared.errors import ModelNotFound, TandemError
    from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, ServerTiming, error_body

    models = {}
    for d in sorted(repository.glob("*/*/manifest.json")):
        b = load_bundle(d.parent, verify_signature=False, variants=["cloud"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        models[b.name] = (b, ort.InferenceSession(str(b.variant_path("cloud")), so, providers=["CPUExecutionProvider"]))
    pool = ThreadPoolExecutor(2)

    async def infer(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        try:
            entry = models.get(request.match_info["model"])
            if entry is None:
                raise ModelNotFound(f"no model {request.match_info['model']!r}")
            b, sess = entry
            req = InferRequest.from_wire(await request.read())
            t1 = time.perf_counter()
            outs = await asyncio.get_running_loop().run_in_executor(pool, sess.run, None, req.inputs)
            t2 = time.perf_counter()
            names = [o.name for o in sess.get_outputs()]
            body = InferResponse(dict(zip(names, outs)), b.name, b.version, req.id).to_wire()
            timing = ServerTiming(queue_us=(t1 - t0) * 1e6, compute_us=(t2 - t1) * 1e6, batch_size=1, queue_depth=0)
            headers = timing.to_headers() | {"X-Tandem-Model-Version": b.version}
            return web.Response(body=body, content_type=CONTENT_TYPE, headers=headers)
        except TandemError as e:
            return web.Response(status=e.status, body=error_body(e.message, e.code), content_type=CONTENT_TYPE)

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_post("/v1/models/{model}/infer", infer)
    app.router.add_post("/v1/models/{model}/versions/{version}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/health/live", ready)
    return app


if __name__ == "__main__":
    from aiohttp import web

    ap = argparse.ArgumentParser()
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    web.run_app(_standin_app(a.repository), host="127.0.0.1", port=a.port, print=None)
