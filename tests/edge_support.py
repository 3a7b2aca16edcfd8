"""Support for the edge/router tests: the real ``tandem serve`` in a process that can be SIGKILLed
and restarted, free ports, and measures of how starved the test process is (for deadline checks)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from support import free_port


class CloudProcess:
    """``tandem serve`` in a subprocess on 127.0.0.1:port (kill() is SIGKILL, start() restarts it)."""

    def __init__(self, repository: Path, public_key: Path, port: int | None = None) -> None:
        self.repository = repository
        self.public_key = public_key
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = repository.parent / f"cloud-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> CloudProcess:
        cmd = [sys.executable, "-m", "tandem.shared.cli", "serve", "--repository", str(self.repository),
               "--host", "127.0.0.1", "--port", str(self.port), "--trusted-key", str(self.public_key),
               "--instances", "1"]
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

    def __enter__(self) -> SchedulerLag:
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

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def toy_cloud(root: Path, keys: tuple[Path, Path]) -> Iterator[CloudProcess]:
    """A real ``tandem serve`` process serving a toy bundle from ``root`` (for a module fixture)."""
    from support import make_bundle

    make_bundle(root / "toy" / "1", keys[0])
    proc = CloudProcess(root, keys[1]).start()
    try:
        yield proc
    finally:
        proc.stop()
