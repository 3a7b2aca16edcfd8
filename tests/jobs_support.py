"""Helpers for the job tests: a repository with the digits-shaped classifier and the slow model,
submits over real HTTP, and polling a job until it finishes (generous deadlines, never a fixed sleep)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_support import make_onnx_bundle, make_slow_onnx, request
from support import make_bundle
from tandem.shared import protocol as p
from tandem.shared.bundle import TensorSpec
from tandem.shared.jobs import TERMINAL_STATUSES
from tandem.shared.tensors import unpackb

ASYNC = {"Prefer": "respond-async"}


def make_jobs_repository(root: Path, private_key: Path) -> Path:
    """REPO/digits/1 (the 64-feature digits classifier of the test fixtures, output ``logits``)
    and REPO/slow/1 (y = 2x after ``work`` rounds of real compute: see cloud_support)."""
    make_bundle(root / "digits" / "1", private_key, name="digits", version="1")
    d = root / "slow" / "1"
    make_onnx_bundle(
        d, private_key, make_slow_onnx(d / "model.onnx"), "slow", "1",
        [TensorSpec(name="x", datatype="FP32", shape=["batch", 8]), TensorSpec(name="work", datatype="INT64", shape=["batch", 1])],
        [TensorSpec(name="y", datatype="FP32", shape=["batch", 8])],
    )
    return root


def digits_body(rows: int = 2, seed: int = 0) -> tuple[np.ndarray, bytes]:
    x = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    return x, p.InferRequest({"input": x}).to_wire()


def slow_body(value: float, work: int = 1, rows: int = 1) -> bytes:
    return p.InferRequest({"x": np.full((rows, 8), value, np.float32), "work": np.full((rows, 1), work, np.int64)}).to_wire()


def submit(url: str, path: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """POST an async submit: (status, headers, parsed JSON body or raw bytes)."""
    status, h, raw = request(url, "POST", path, body, {**ASYNC, **(headers or {})}, timeout=timeout)
    if h.get("Content-Type", "").startswith("application/json"):
        doc: Any = json.loads(raw)
    elif h.get("Content-Type") == p.CONTENT_TYPE:
        doc = unpackb(raw)  # an error on the native route, as the synchronous call answers it
    else:
        doc = raw
    return status, h, doc


def job_status(url: str, job_id: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, raw = request(url, "GET", f"/v1/jobs/{job_id}", headers=headers)
    return status, json.loads(raw) if raw else None


def wait_done(url: str, job_id: str, timeout: float = 120.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll the job until it succeeded or failed; its status document."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        status, doc = job_status(url, job_id, headers)
        assert status == 200, (status, doc)
        if doc["status"] in TERMINAL_STATUSES:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {doc['status']} after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def wait_for(condition: Any, timeout: float = 120.0, what: str = "condition") -> Any:
    """Poll ``condition()`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


# --- processes -------------------------------------------------------------------------------------


def start_tandem(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``tandem ARGS`` as a real process; stdout and stderr go to ``log`` (never a pipe nobody reads)."""
    out = open(log, "ab")  # noqa: SIM115 - the process holds it; closed when the test's tmp dir goes
    return subprocess.Popen([sys.executable, "-m", "tandem.shared.cli", *args], stdout=out, stderr=subprocess.STDOUT)


def wait_line(proc: subprocess.Popen[bytes], log: Path, prefix: str, timeout: float = 120.0) -> str:
    """The first line of ``log`` starting with ``prefix``; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {prefix!r}: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no line {prefix!r} within {timeout} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM, wait; SIGKILL if it does not stop. The exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(30)
