"""``tandem serve --workers 2`` as real processes: both workers answer, /metrics sums them, model
load/unload reaches every worker (a replacement included), a SIGKILLed worker is replaced, SIGTERM
drains every worker and exits 0."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_support import free_port, make_repository, request, slow_inputs
from tandem.shared import protocol as p

WORKER = "X-Tandem-Worker"


def _serve(repo: Path, public_key: Path, port: int, log: Path, tmp: Path, **more: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "TANDEM_WORKERS": "2",  # the env source, as a deployment would set it
        "TANDEM_WARMUP_BATCH_SIZES": "[1]",
        "TANDEM_MODEL_BATCHING": json.dumps({"slow": {"max_batch_size": 1}}),
        "TMPDIR": str(tmp),  # where the supervisor puts its metrics directory (checked: removed at exit)
        # Draining 16 slow requests takes a few seconds here, but on a loaded machine more than the
        # default 30 s; past it the drain closes what is left, which these tests would take for a loss.
        "TANDEM_SHUTDOWN_TIMEOUT_S": "180",
        "PYTHONFAULTHANDLER": "1",  # SIGABRT writes every thread's stack to the log (see _exit_code)
        **more,
    }
    # The log goes to a file: an undrained pipe would stall the workers (see test_cloud_cli.py).
    return subprocess.Popen(
        [sys.executable, "-m", "tandem.cloud", "--repository", str(repo), "--trusted-key", str(public_key), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,  # noqa: SIM115 - closed with the process
    )


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 60) -> list[int]:
    """The worker pids from the supervisor's start-up lines, once it printed ``ready``."""
    assert proc.stdout is not None
    pids: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited early with {proc.wait(5)}")
        if m := re.match(r"\s*workers=2\s+pids=([\d,]+)", line):
            pids = [int(x) for x in m.group(1).split(",")]
        if line.startswith("ready "):
            return pids
    raise AssertionError("server did not print ready in time")


def _toy_calls(url: str, n: int, threads: int = 16) -> list[tuple[int, dict[str, str], bytes]]:
    # request() opens a new connection per call, so the kernel picks a worker for each one.
    body = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: request(url, "POST", p.infer_path("toy"), body, timeout=20), range(n)))


def _metric(url: str, name: str, model: str) -> float:
    """The value of one metric for model (version 1), summed over the sample lines that match."""
    text = request(url, "GET", "/metrics")[2].decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and f'model="{model}"' in line]
    assert values, f"{name} for {model} missing from /metrics"
    return sum(values)


def _front_door_requests(url: str) -> float:
    text = request(url, "GET", "/metrics")[2].decode()
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith("tandem_front_door_requests_total "))


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _exit_code(proc: subprocess.Popen[str], log: Path, timeout: float) -> int:
    """The supervisor's exit code; if it is still running after ``timeout``, the failure shows the
    stacks of the processes left (SIGABRT under PYTHONFAULTHANDLER) and the end of the log."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        left = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in [*map(int, left), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(2)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-200:])
        raise AssertionError(f"the server still ran {timeout:g} s after its last answer (workers left: {left}); log:\n{tail}") from None


def _serve_dirs(tmp: Path) -> list[str]:
    return [d.name for d in tmp.iterdir() if d.name.startswith("tandem-serve-")]


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()  # the supervisor; its workers see their stdin close and exit
        proc.wait(10)


def test_two_workers_share_the_port_the_metrics_and_model_control_and_survive_a_kill(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve(repo, keys[1], port, log, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        pids = _wait_ready(proc)
        assert len(set(pids)) == 2 and proc.pid not in pids
        assert request(url, "GET", "/v2/health/ready")[0] == 200

        results = _toy_calls(url, 400)
        assert [r[0] for r in results] == [200] * 400
        assert {int(r[1][WORKER]) for r in results} == set(pids)  # both workers answered
        # The front door counts in a plain int and publishes it at a scrape of its own worker and
        # at the periodic refresh: one scrape (reaching one worker) a moment later has both.
        time.sleep(0.5)
        assert _front_door_requests(url) == 400
        # Counters sum over the workers, whichever one is asked; gauges are live sums.
        for _ in range(4):
            assert _metric(url, "tandem_inference_request_success_total", "toy") == 400
            (stats,) = json.loads(request(url, "GET", "/v2/models/toy/stats")[2])["model_stats"]
            assert stats["inference_stats"]["success"]["count"] == 400 and stats["inference_count"] == 400
        assert _metric(url, "tandem_model_instances", "toy") == 2

        # Model control reaches every worker, whichever one the request lands on.
        status, _, raw = request(url, "POST", "/v2/repository/models/toy/unload", b"{}")
        assert status == 200, raw
        results = _toy_calls(url, 40)
        assert {r[0] for r in results} == {503} and {int(r[1][WORKER]) for r in results} == set(pids)
        for _ in range(4):
            index = json.loads(request(url, "POST", "/v2/repository/index", b"{}")[2])
            assert {(r["name"], r["state"]) for r in index} == {("toy", "UNAVAILABLE")}
        # A change that fails fails on every worker, and the answer says so.
        status, _, raw = request(url, "POST", "/v2/repository/models/nope/load", b"{}")
        error = json.loads(raw)
        assert status == 404 and error["code"] == "model_not_found", raw
        assert re.match(r"worker [12]/2 \(pid \d+\): no model 'nope'.*\(2 of 2 workers failed\)", error["error"]), error

        os.kill(pids[0], signal.SIGKILL)
        _wait_for(lambda: "exited unexpectedly" in log.read_text(), 10, "the supervisor to notice the kill")
        _wait_for(lambda: len(re.findall(r"worker \d/2 ready: pid", log.read_text())) == 3, 30, "the replacement to be ready")
        # The replacement loaded every model on disk, then applied the unload standing before ready.
        results = _toy_calls(url, 40)
        assert {r[0] for r in results} == {503}
        answered = {int(r[1][WORKER]) for r in results}
        assert pids[0] not in answered and pids[1] in answered and len(answered) == 2

        status, _, raw = request(url, "POST", "/v2/repository/models/toy/load", b"{}")
        assert status == 200, raw
        results = _toy_calls(url, 200)
        assert [r[0] for r in results] == [200] * 200
        answered = {int(r[1][WORKER]) for r in results}
        assert pids[0] not in answered and pids[1] in answered and len(answered) == 2  # the replacement serves
        # The dead worker's counts stay in the totals; its instances gauge no longer counts.
        assert _metric(url, "tandem_inference_request_success_total", "toy") == 600
        assert _metric(url, "tandem_model_instances", "toy") == 2
        assert proc.poll() is None
    finally:
        _stop(proc)


def test_sigterm_drains_every_worker_then_exits_0(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=(), slow=True, varlen=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve(repo, keys[1], port, log, tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        pids = _wait_ready(proc)
        assert _serve_dirs(tmp)  # the supervisor's metrics directory
        # ~0.5 s each on one intra-op thread here (one at a time per worker): all are still pending
        # when the signal arrives. 16 connections, so that the kernel's spread leaves both workers
        # some to drain but with odds of 2 in 65536 (with 8 it was 1 in 128).
        body = p.InferRequest(slow_inputs(2500)).to_wire()
        n = 16
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            # Each takes ~0.5 s alone but ~10 s on a machine whose cores other processes keep busy
            # (the compute threads run at a lower priority, see compute_nice): wait long enough.
            futures = [pool.submit(request, url, "POST", p.infer_path("slow"), body, None, 300) for _ in range(n)]
            # All n accepted: the pending gauge summed over both workers says so.
            _wait_for(lambda: _metric(url, "tandem_inference_pending_request_count", "slow") == n, 10, "all requests accepted")
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=300) for f in futures]
        assert [status for status, _, _ in results] == [200] * n
        assert {int(h[WORKER]) for _, h, _ in results} == set(pids)  # both workers had some to drain
        for _, _, raw in results:
            np.testing.assert_array_equal(p.InferResponse.from_wire(raw).outputs["y"], np.full((1, 8), 2, np.float32))
        code = _exit_code(proc, log, 60)
        text = log.read_text()
        assert code == 0, text[-20_000:]  # a worker's exit watchdog (server.py) leaves its stacks there
        assert text.count("draining") == 2 and "workers exited: 0, 0" in text
        assert not _serve_dirs(tmp)  # ... removed at exit
    finally:
        _stop(proc)


def test_a_worker_that_keeps_dying_makes_the_server_exit_1(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from tandem.cloud.workers import MAX_RESTARTS

    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve(repo, keys[1], port, log, tmp_path)
    try:
        _wait_ready(proc)

        def readies() -> list[int]:
            return [int(pid) for pid in re.findall(r"worker 1/2 ready: pid (\d+)", log.read_text())]

        for restart in range(MAX_RESTARTS):  # each death within the budget is restarted
            os.kill(readies()[-1], signal.SIGKILL)
            _wait_for(lambda restart=restart: len(readies()) == restart + 2, 30, f"restart {restart + 1}")
            assert proc.poll() is None
        os.kill(readies()[-1], signal.SIGKILL)  # one more within the minute: give up
        assert proc.wait(30) == 1
        assert "giving up" in log.read_text()
        with pytest.raises(OSError):  # the surviving worker was stopped too
            request(f"http://127.0.0.1:{port}", "GET", "/v2/health/live", timeout=2)
    finally:
        _stop(proc)


def test_the_supervisor_answers_a_change_once_every_live_worker_has_or_has_died() -> None:
    from tandem.cloud.control import APPLIED, CONTROL, Broadcasts

    b = Broadcasts(2)
    ask = CONTROL + json.dumps({"id": "100-1", "op": "unload", "model": "toy"})
    sent = b.request(0, 100, ask, {0: 100, 1: 200})
    assert [(i, pid) for i, pid, _ in sent] == [(0, 100), (1, 200)]
    assert all(line.startswith("apply ") and json.loads(line[6:])["op"] == "unload" for _, _, line in sent)
    assert b.applied(0, 100, APPLIED + json.dumps({"id": "100-1", "ok": True})) == []  # worker 2 still owes one
    assert b.applied(1, 999, APPLIED + json.dumps({"id": "100-1", "ok": True})) == []  # not the pid asked
    (index, pid, line), = b.gone(1, 200)  # worker 2 died: the change is done
    assert (index, pid) == (0, 100) and line.startswith("result ")
    assert [r["worker"] for r in json.loads(line[7:])["results"]] == ["1/2 (pid 100)"]
    # The unload stands for workers that start later; a load lifts it.
    assert [json.loads(x[6:])["model"] for x in b.replay()] == ["toy"]
    b.request(1, 300, CONTROL + json.dumps({"id": "300-1", "op": "load", "model": "toy"}), {0: 100, 1: 300})
    assert b.replay() == []
    # Garbage from a worker is logged and ignored.
    assert b.request(0, 100, CONTROL + "{not json", {0: 100}) == []
    assert b.request(0, 100, CONTROL + json.dumps({"id": "x", "op": "drop", "model": "toy"}), {0: 100}) == []
    assert b.applied(0, 100, APPLIED + "[]") == []


async def test_a_model_change_waiting_on_the_workers_ends_when_the_server_drains() -> None:
    """A load/unload waits for every worker through the supervisor; at shutdown it must not hold
    the drain up to the shutdown timeout (here no supervisor ever answers)."""
    import asyncio

    from tandem.cloud.control import WorkerControl
    from tandem.shared.errors import Unavailable

    class _Repository:  # what the supervisor would have this worker apply: never asked here
        async def load(self, name: str) -> None: ...

        async def unload(self, name: str) -> None: ...

    sent: list[str] = []
    control = WorkerControl(_Repository(), sent.append, on_go=lambda: None)
    try:
        change = asyncio.create_task(control.load("toy"))
        await asyncio.sleep(0.05)
        assert len(sent) == 1 and not change.done()  # asked the supervisor, waiting
        control.drain()
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(change, 1)
        with pytest.raises(Unavailable, match="shutting down"):
            await control.unload("toy")
        assert len(sent) == 1  # the refused change never reached the supervisor
    finally:
        await control.close()


def test_a_worker_still_running_past_its_shutdown_bounds_is_killed_and_the_server_exits_1(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from tandem.cloud.config import EXIT_GRACE_S

    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve(repo, keys[1], port, log, tmp_path, TANDEM_SHUTDOWN_TIMEOUT_S="1")
    try:
        frozen, other = _wait_ready(proc)
        # A stopped process cannot run its own exit watchdog (server.py): only the supervisor can end it.
        os.kill(frozen, signal.SIGSTOP)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Its bound: shutdown_timeout_s (1) + EXIT_GRACE_S + the supervisor's margin (5 s).
        assert proc.wait(EXIT_GRACE_S + 60) == 1
        assert time.monotonic() - started >= 1 + EXIT_GRACE_S
        text = log.read_text()
        assert re.search(rf"\(pid {frozen}\) still runs \d+ s after it was told to stop: killing it", text)
        assert "draining" in text  # the other worker drained and exited on its own
        for pid in (frozen, other):  # and no process is left behind
            _wait_for(lambda pid=pid: not _alive(pid), 10, f"pid {pid} gone")
    finally:
        _stop(proc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
