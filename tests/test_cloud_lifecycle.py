"""``tandem serve`` start-up tells the truth: a repository with nothing servable, a missing one or a
port in use is one clear line and a non-zero exit, never a server that says ready while every
request fails; readiness means every model found at start-up is loaded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_support import free_port, make_repository, request
from support import make_keys
from test_cloud_cli import _serve, _wait_ready

ROOT = Path(__file__).resolve().parents[1]


def _fails(args: list[str], *needles: str) -> str:
    proc = _serve(args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, (out, err)
    assert "ready" not in out and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def repo(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)


def test_a_missing_repository_is_refused_and_never_created(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    missing = tmp_path / "typo"
    _fails(["--repository", str(missing), "--trusted-key", str(keys[1])], str(missing), "does not exist")
    assert not missing.exists()


def _break_onnx(repo: Path) -> None:
    onnx = next((repo / "toy" / "1").glob("cloud*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-20] + b"\0" * 20)


def _truncate_manifest(repo: Path) -> None:
    manifest = repo / "toy" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])


@pytest.mark.parametrize("breakage", ["corrupted-onnx", "truncated-manifest", "wrong-key", "not-a-bundle", "empty"])
def test_a_repository_with_nothing_servable_exits_non_zero_naming_why(
    tmp_path: Path, repo: Path, keys: tuple[Path, Path], breakage: str
) -> None:
    key = keys[1]
    if breakage == "corrupted-onnx":
        _break_onnx(repo)
    elif breakage == "truncated-manifest":
        _truncate_manifest(repo)
    elif breakage == "wrong-key":
        key = make_keys(tmp_path / "other")[1]
    elif breakage == "not-a-bundle":
        (repo / "toy" / "1").rename(tmp_path / "moved")
    else:
        (repo / "toy" / "1").rename(tmp_path / "moved")
        (repo / "toy").rmdir()
    line = _fails(["--repository", str(repo), "--trusted-key", str(key), "--port", str(free_port())], "no model can be served")
    if breakage != "empty":
        assert "toy" in line
    assert "--allow-empty" in line


def _healthcheck(port: int) -> int:
    env = {**os.environ, "TANDEM_PORT": str(port)}
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], env=env, capture_output=True, timeout=30).returncode


def test_readiness_is_503_while_a_model_found_at_start_is_not_loaded(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Two models, one broken: the good one serves, readiness says 503 and the health check fails;
    with --allow-empty a repository whose only model is broken starts, not ready."""
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=True, varlen=False)
    onnx = repo / "slow" / "1" / "model.onnx"
    onnx.write_bytes(b"broken")
    port = free_port()
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port)], stderr=tmp_path / "log")
    try:
        _wait_ready(proc)
        url = f"http://127.0.0.1:{port}"
        assert request(url, "GET", "/v2/health/ready")[0] == 503
        assert request(url, "GET", "/v2/models/toy/ready")[0] == 200
        assert _healthcheck(port) != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "not served: model slow version 1" in (tmp_path / "log").read_text()
    (repo / "toy").rename(tmp_path / "toy")
    port = free_port()
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port), "--allow-empty"], stderr=tmp_path / "log2")
    try:
        _wait_ready(proc)
        assert request(f"http://127.0.0.1:{port}", "GET", "/v2/health/ready")[0] == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_an_empty_repository_with_allow_empty_is_ready(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    (tmp_path / "repo").mkdir()
    port = free_port()
    proc = _serve(["--repository", str(tmp_path / "repo"), "--trusted-key", str(keys[1]), "--port", str(port), "--allow-empty"])
    try:
        _wait_ready(proc)
        assert request(f"http://127.0.0.1:{port}", "GET", "/v2/health/ready")[0] == 200
        assert _healthcheck(port) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_one_line_and_a_non_zero_exit(repo: Path, keys: tuple[Path, Path], workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port), "--workers", str(workers)])
        out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "ready" not in out
    assert "Traceback" not in err
    # One line (each worker that tried says the same).
    assert {line for line in err.splitlines() if line.startswith("error:")} == {
        f"error: cannot listen on 127.0.0.1:{port}: the address is already in use"
    }
