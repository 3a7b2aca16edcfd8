"""``tandem serve --workers N``: N server processes on one port, each with its own event loop.

Why: one aiohttp event loop tops out near 9k small requests/s, far below what onnxruntime can
compute, so the loop (parsing, routing, encoding) is the bottleneck. More processes, more loops.

How: the supervisor (this module, in the ``tandem serve`` process) binds nothing. It starts N
workers (``python -m tandem.cloud.server CONFIG PORT``), each running the usual app on host:port
with SO_REUSEPORT, so the kernel spreads connections among them. Supervisor and worker talk over
the worker's stdio:

* worker -> supervisor (stdout): the model lines and ``ready http://host:port`` once it listens;
  the ``tandem-control`` / ``tandem-applied`` lines of a model load or unload (control.py);
* supervisor -> worker (stdin): ``go`` once every worker listens (until then a worker's
  ``/v2/health/ready`` says 503: any worker may answer a health check, so one ready worker must
  not make the whole server look ready), which the worker answers ``serving`` once it says ready; the ``apply`` / ``result`` lines of a model change, which
  reaches every worker (the unloads standing are applied before ``go``); end of file means the
  supervisor is gone, and the worker drains and exits (no orphans serving a port after a
  ``kill -9`` of the supervisor).

The supervisor prints the usual ``ready`` line when every worker answered ``serving``, forwards
SIGTERM/SIGINT (each worker drains as a single server does) and exits 0 when all exited 0. A worker
still running ``_KILL_MARGIN_S`` past its own bounds (shutdown delay, drain, exit grace) is killed,
and the supervisor exits 1. A worker that dies otherwise is logged and restarted, at most
``MAX_RESTARTS`` times in ``RESTART_WINDOW_S``; beyond that the supervisor stops the others and
exits 1. Metrics use prometheus_client's multiprocess mode
in a fresh temporary directory (see metrics.py), removed at exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import EXIT_GRACE_S, ServerConfig
from .control import APPLIED, CONTROL, Broadcasts

__all__ = ["supervise", "follow_supervisor", "MAX_RESTARTS", "RESTART_WINDOW_S", "SERVING"]

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
_GO = "go"
#: A worker's answer to ``go``: it now says ready.
SERVING = "serving"
_POLL_S = 0.1
#: Past a worker's own exit bound (server.py), before the supervisor kills it: a worker whose
#: watchdog cannot run (stopped, or stuck in the kernel) must not hold the server up for ever.
_KILL_MARGIN_S = 5.0
_log = logging.getLogger("tandem.cloud.workers")


# --- worker side -----------------------------------------------------------------------------------


def follow_supervisor(loop: asyncio.AbstractEventLoop, on_line: Callable[[str], None], on_eof: Callable[[], None]) -> None:
    """Read the supervisor's lines from stdin in a daemon thread; ``on_line(line)`` runs each on
    ``loop`` (``go``, and the model changes of control.py), ``on_eof()`` runs at end of file."""

    def call(fn: Callable[..., None], *args: str) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is already closed: the worker is exiting anyway
            pass

    def read() -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside a buffered
        # reader holds its lock, and the interpreter aborts at exit when it cannot take it.
        fd = sys.stdin.fileno()
        pending = b""
        while chunk := os.read(fd, 256):
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                call(on_line, line.decode(errors="replace"))
        call(on_eof)

    threading.Thread(target=read, name="tandem-supervisor", daemon=True).start()


# --- supervisor side -------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ready: bool = False  # listening
    serving: bool = False  # told ``go``, and says ready


@dataclass
class _Supervisor:
    config: ServerConfig
    tmp: Path
    port: int = 0
    workers: list[_Worker] = field(default_factory=list)
    #: (worker index, pid, stdout line or None at end of file), from the reader threads
    events: queue.SimpleQueue[tuple[int, int, str | None]] = field(default_factory=queue.SimpleQueue)
    stopping: bool = False
    failed: bool = False
    restarts: collections.deque[float] = field(default_factory=collections.deque)
    signalled: list[int] = field(default_factory=list)
    #: Once stopping: when workers still running are killed (None: not stopping, or done)
    kill_at: float | None = None
    broadcasts: Broadcasts = field(init=False)

    def __post_init__(self) -> None:
        self.broadcasts = Broadcasts(self.config.workers)

    @property
    def metrics_dir(self) -> Path:
        return self.tmp / "metrics"

    def start(self, index: int) -> _Worker:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cloud.server", str(self.tmp / "config.json"), str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,  # stderr (logs): the supervisor's
        )
        worker = _Worker(index, proc)
        threading.Thread(target=self._read, args=(worker,), name=f"tandem-worker-{index}", daemon=True).start()
        _log.info("worker %d/%d started: pid %d", index + 1, self.config.workers, proc.pid)
        return worker

    def _read(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None
        for raw in worker.proc.stdout:
            self.events.put((worker.index, worker.proc.pid, raw.decode(errors="replace").rstrip("\n")))
        self.events.put((worker.index, worker.proc.pid, None))

    def go(self, worker: _Worker) -> None:
        """Let a worker report ready, once it has applied the model unloads standing."""
        for line in self.broadcasts.replay():
            self.send(worker.index, worker.proc.pid, line)
        self.send(worker.index, worker.proc.pid, _GO)

    def send(self, index: int, pid: int, line: str) -> None:
        """Write one line to worker ``index`` if it is still process ``pid``."""
        worker = self.workers[index] if index < len(self.workers) else None
        if worker is None or worker.proc.pid != pid:
            return
        try:
            assert worker.proc.stdin is not None
            worker.proc.stdin.write(line.encode() + b"\n")
            worker.proc.stdin.flush()
        except OSError:  # it died meanwhile; the main loop sees that
            pass

    def _alive(self) -> dict[int, int]:
        return {w.index: w.proc.pid for w in self.workers if w.proc.poll() is None}

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def handle_events(self, announce: bool) -> None:
        """Mark ready workers; forward worker 1's model lines while ``announce`` (first start-up)."""
        while True:
            try:
                index, pid, line = self.events.get(timeout=_POLL_S)
            except queue.Empty:
                return
            worker = self.workers[index] if index < len(self.workers) else None
            if line is None or worker is None or worker.proc.pid != pid:
                continue  # end of file (poll() sees the exit) or a line from a replaced worker
            if line.startswith(CONTROL):
                for target in self.broadcasts.request(index, pid, line, self._alive()):
                    self.send(*target)
            elif line.startswith(APPLIED):
                for target in self.broadcasts.applied(index, pid, line):
                    self.send(*target)
            elif line == SERVING:
                worker.serving = True
            elif line.startswith("ready "):
                worker.ready = True
                if not self.port:
                    self.port = int(line.rsplit(":", 1)[1])
                _log.info("worker %d/%d ready: pid %d", index + 1, self.config.workers, pid)
                if not announce:
                    self.go(worker)  # a restarted worker joins the running server at once
            elif announce and index == 0:
                print(line, flush=True)

    def reap(self, running: bool) -> None:
        """Notice exited workers; restart unexpected exits while ``running`` (within the budget)."""
        for i, w in enumerate(self.workers):
            code = w.proc.poll()
            if code is None or self.stopping:
                continue
            from prometheus_client import multiprocess

            # Its gauges ('livesum') must no longer count; its counters stay in the totals.
            multiprocess.mark_process_dead(w.proc.pid, str(self.metrics_dir))
            for target in self.broadcasts.gone(i, w.proc.pid):  # it owes no answer any more
                self.send(*target)
            if not running:
                _log.error("worker %d/%d (pid %d) exited with %s while starting", i + 1, self.config.workers, w.proc.pid, code)
                self.fail()
                return
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
                self.restarts.popleft()
            if len(self.restarts) >= MAX_RESTARTS:
                _log.error(
                    "worker %d/%d (pid %d) exited with %s; %d restarts in %.0f s already: giving up",
                    i + 1, self.config.workers, w.proc.pid, code, MAX_RESTARTS, RESTART_WINDOW_S,
                )
                self.fail()
                return
            self.restarts.append(now)
            _log.error("worker %d/%d (pid %d) exited unexpectedly with %s: restarting it", i + 1, self.config.workers, w.proc.pid, code)
            self.workers[i] = self.start(i)

    def fail(self) -> None:
        self.failed = True
        self.stop()
        self.signal_all(signal.SIGTERM)

    def stop(self) -> None:
        """Restart no worker from now on; those still running past every bound they have
        (shutdown delay, drain, exit) are killed, see :meth:`kill_late`."""
        if not self.stopping:
            self.stopping = True
            self.kill_at = time.monotonic() + self._bound_s()

    def _bound_s(self) -> float:
        c = self.config
        return c.shutdown_delay_s + c.shutdown_timeout_s + EXIT_GRACE_S + _KILL_MARGIN_S

    def kill_late(self) -> None:
        if self.kill_at is None or time.monotonic() < self.kill_at:
            return
        self.kill_at = None
        for i, w in enumerate(self.workers):
            if w.proc.poll() is None:
                _log.error(
                    "worker %d/%d (pid %d) still runs %.0f s after it was told to stop: killing it",
                    i + 1, self.config.workers, w.proc.pid, self._bound_s(),
                )
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                self.failed = True

    def run(self) -> int:
        def on_signal(signum: int, frame: object) -> None:
            self.signalled.append(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        self.port = self.config.port
        # Port 0: the first worker picks the port, the others then join it.
        self.workers.append(self.start(0))
        announced = gone = False
        while True:
            if self.signalled and not self.stopping:
                self.stop()
                _log.info("stopping: forwarding the signal to %d workers", len(self.workers))
            if self.signalled:
                got = self.signalled.pop()
                self.signal_all(signal.SIGTERM if got == signal.SIGTERM else signal.SIGINT)
            self.handle_events(announce=not announced)
            self.reap(running=announced)
            if self.stopping:
                if all(w.proc.poll() is not None for w in self.workers):
                    break
                self.kill_late()
                continue
            if len(self.workers) < self.config.workers and self.port:
                self.workers.extend(self.start(i) for i in range(len(self.workers), self.config.workers))
            if not gone and len(self.workers) == self.config.workers and all(w.ready for w in self.workers):
                for w in self.workers:
                    self.go(w)
                gone = True
            # Ready once every worker says it is (a restarted one is told go while starting).
            if gone and not announced and all(w.serving for w in self.workers):
                host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
                print(f"  workers={self.config.workers}  pids={','.join(str(w.proc.pid) for w in self.workers)}", flush=True)
                print(f"ready http://{host}:{self.port}", flush=True)
                announced = True
        codes = [w.proc.returncode for w in self.workers]
        _log.info("workers exited: %s", ", ".join(str(c) for c in codes))
        return 1 if self.failed or any(c != 0 for c in codes) else 0


def supervise(config: ServerConfig) -> int:
    """Run ``config.workers`` worker processes until a signal; see the module docstring."""
    tmp = Path(tempfile.mkdtemp(prefix="tandem-serve-"))
    try:
        (tmp / "metrics").mkdir()
        # The resolved configuration (flags, env, file), so every worker serves exactly the same.
        (tmp / "config.json").write_text(config.model_dump_json())
        return _Supervisor(config, tmp).run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
