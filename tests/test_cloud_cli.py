"""``tandem serve`` as a real process: ready line, SIGTERM drains accepted requests, exit 0; config sources."""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_support import free_port, make_repository, request, slow_inputs
from tandem.cloud.config import load_config
from tandem.shared import protocol as p
from tandem.shared.errors import InvalidInput


def _serve(args: list[str], env: dict[str, str] | None = None, stderr: Path | None = None) -> subprocess.Popen[str]:
    # The access log goes to stderr: a pipe nobody drains would fill up and stall the server, so a
    # long-running server writes it to a file.
    err = open(stderr, "w") if stderr is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "tandem.shared.cli", "serve", *args],
        stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **(env or {})},
    )


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 60) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited early with {proc.wait(5)}")
        lines.append(line)
        if line.startswith("ready "):
            return lines
    raise AssertionError("server did not print ready in time")


def _slow_counts(url: str) -> tuple[float, float]:
    """(pending, answered) requests of slow:1, from /metrics. A loaded machine may answer the first
    requests before the last ones arrive, so "all accepted" is pending + answered."""
    from prometheus_client.parser import text_string_to_metric_families

    pending = answered = 0.0
    for family in text_string_to_metric_families(request(url, "GET", "/metrics")[2].decode()):
        for sample in family.samples:
            if sample.labels.get("model") != "slow":
                continue
            if sample.name == "tandem_inference_pending_request_count":
                pending += sample.value
            elif sample.name == "tandem_inference_request_success_total":
                answered += sample.value
    return pending, answered


def test_sigterm_drains_accepted_requests_then_exits_0(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=(), varlen=False)
    cfg = tmp_path / "serve.toml"
    cfg.write_text('warmup_batch_sizes = [1]\n[model_batching.slow]\nmax_batch_size = 1\n')
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port), "--config", str(cfg)], stderr=log)
    try:
        lines = _wait_ready(proc)
        assert lines[-1].strip() == f"ready http://127.0.0.1:{port}"
        assert any("slow:1" in line and "providers=CPUExecutionProvider" in line for line in lines)
        url = f"http://127.0.0.1:{port}"
        body = p.InferRequest(slow_inputs(100)).to_wire()
        n = 6
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(request, url, "POST", p.infer_path("slow"), body) for _ in range(n)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait until all n are accepted (answered, queued or computing)
                pending, answered = _slow_counts(url)
                if pending + answered >= n and pending > 0:
                    break
                time.sleep(0.005)
            else:
                raise AssertionError(f"requests were not all accepted ({pending} pending, {answered} answered)")
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
        assert [status for status, _, _ in results] == [200] * n
        for _, _, raw in results:
            np.testing.assert_array_equal(p.InferResponse.from_wire(raw).outputs["y"], np.full((1, 8), 2, np.float32))
        assert proc.wait(30) == 0
        assert "draining" in log.read_text()
        with pytest.raises(OSError):
            request(url, "GET", "/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_drain_that_runs_out_of_time_ends_within_shutdown_timeout_and_exits_0(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The drain's steps (front door, aiohttp, batchers) share one shutdown_timeout_s: one after
    the other with a full timeout each, they would take twice as long, past the exit watchdog."""
    from tandem.cloud.config import EXIT_GRACE_S

    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=(), varlen=False)
    cfg = tmp_path / "serve.toml"
    timeout = 12
    cfg.write_text(f'warmup_batch_sizes = [1]\nshutdown_timeout_s = {timeout}\n[model_batching.slow]\nmax_batch_size = 1\n')
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port), "--config", str(cfg)], stderr=log)
    try:
        _wait_ready(proc)
        url = f"http://127.0.0.1:{port}"
        # ~60 s each (more on a loaded machine), one at a time: the first still computes when the
        # time is up, past two timeouts; the second still waits.
        body = p.InferRequest(slow_inputs(300_000)).to_wire()
        n = 2
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(request, url, "POST", p.infer_path("slow"), body, None, 120) for _ in range(n)]
            deadline = time.monotonic() + 60
            while sum(_slow_counts(url)) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = proc.wait(timeout + EXIT_GRACE_S + 30)
            elapsed = time.monotonic() - started
            answered = [f.result()[0] for f in futures if f.exception(timeout=5) is None]  # every one ended
        text = log.read_text()
        assert code == 0, text[-5000:]
        assert "Timeout (" not in text  # the exit watchdog did not have to fire
        # The batch computing at the end is abandoned: tearing onnxruntime down under it aborted the process.
        assert "still computing after the drain: exiting without waiting" in text
        assert timeout - 1 < elapsed < timeout + EXIT_GRACE_S, elapsed
        assert answered == []  # neither had its answer in time: their connections were closed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_server_whose_exit_hangs_after_its_drain_ends_itself_with_every_stack(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from tandem.cloud.config import EXIT_GRACE_S

    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    port, log = free_port(), tmp_path / "serve.log"
    # The real server, with something at interpreter exit that never returns (as a stuck finalizer
    # or a thread joined at exit would).
    hang = "import atexit, threading; atexit.register(threading.Event().wait)"
    code = f"{hang}; import sys; from tandem.shared.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,  # noqa: SIM115 - closed with the process
    )
    try:
        _wait_ready(proc)
        assert request(f"http://127.0.0.1:{port}", "GET", "/v2/health/ready")[0] == 200
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(EXIT_GRACE_S + 60) == 1
        assert time.monotonic() - started >= EXIT_GRACE_S - 1
        text = log.read_text()
        assert "stopped" in text  # the drain itself ended ...
        assert f"Timeout ({datetime.timedelta(seconds=EXIT_GRACE_S)})!" in text and "most recent call first" in text  # ... and the stacks show where it hung
        assert "in wait" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

def test_cli_errors_are_clear(tmp_path: Path) -> None:
    proc = _serve(["--repository", str(tmp_path)])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "--trusted-key" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("port = 'x'\n")
    proc = _serve(["--repository", str(tmp_path), "--insecure-skip-signature", "--config", str(bad)])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "port" in err


def test_config_sources_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("repository: /r\nport: 9001\ninstances: 2\nbatching:\n  max_batch_size: 8\ncanary:\n  toy: {'1': 95, '2': 5}\n")
    c = load_config(yml)
    assert (c.port, c.instances, c.batching.max_batch_size, c.canary["toy"]["2"]) == (9001, 2, 8, 5)
    monkeypatch.setenv("TANDEM_PORT", "9002")
    monkeypatch.setenv("TANDEM_BATCHING__MAX_QUEUE_SIZE", "7")
    c = load_config(yml)
    assert c.port == 9002 and c.batching.max_queue_size == 7  # env beats the file
    assert load_config(yml, port=9003).port == 9003  # flags beat env
    assert c.threads_per_session() == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(InvalidInput, match="canary"):
        load_config(None, repository="/r", canary={"toy": {"1": 0}})
    (tmp_path / "c.ini").write_text("[x]\n")
    with pytest.raises(InvalidInput, match="must end in"):
        load_config(tmp_path / "c.ini")
    with pytest.raises(InvalidInput, match="preferred_batch_sizes"):
        load_config(None, repository="/r", batching={"max_batch_size": 4, "preferred_batch_sizes": [8]})


def test_workers_turn_fill_wait_on_unless_it_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several workers each queue sees a share of the load: batching configs that leave
    fill_wait_us unset wait 1000 us for fuller batches; an explicit value (0 included) stands."""
    c = load_config(None, repository="/r", workers=2, model_batching={"a": {"max_batch_size": 8}, "b": {"fill_wait_us": 0}})
    assert (c.batching.fill_wait_us, c.batching_for("a").fill_wait_us, c.batching_for("a").max_batch_size) == (1000, 1000, 8)
    assert c.batching_for("b").fill_wait_us == 0
    assert load_config(None, repository="/r").batching.fill_wait_us == 0  # one process: off
    monkeypatch.setenv("TANDEM_WORKERS", "2")
    monkeypatch.setenv("TANDEM_BATCHING__FILL_WAIT_US", "0")
    assert load_config(None, repository="/r").batching.fill_wait_us == 0
    monkeypatch.delenv("TANDEM_BATCHING__FILL_WAIT_US")
    monkeypatch.setenv("TANDEM_BATCHING__MAX_BATCH_SIZE", "16")
    c = load_config(None, repository="/r")
    assert (c.batching.fill_wait_us, c.batching.max_batch_size) == (1000, 16)
    # What the supervisor hands its workers keeps the same settings.
    assert type(c).model_validate_json(c.model_dump_json()).batching == c.batching


def test_a_stalled_log_reader_does_not_stall_the_server(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    port = free_port()
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port)])  # stderr: a pipe nobody reads
    try:
        _wait_ready(proc)
        body = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()
        for _ in range(1500):  # ~1500 access-log lines: several times a pipe's 64 KiB buffer
            assert request(f"http://127.0.0.1:{port}", "POST", p.infer_path("toy"), body, timeout=10)[0] == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and err.count('"status":200') == 1500
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _toy_server(tmp_path: Path, keys: tuple[Path, Path], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), varlen=False)
    port = free_port()
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port)],
                  env={"TANDEM_WARMUP_BATCH_SIZES": "[1]", **env}, stderr=tmp_path / "serve.log")
    _wait_ready(proc)
    return proc, f"http://127.0.0.1:{port}"


def _until_not_ready(url: str) -> None:
    deadline = time.monotonic() + 10
    while request(url, "GET", "/v2/health/ready")[0] == 200:
        assert time.monotonic() < deadline, "still ready after SIGTERM"
        time.sleep(0.02)


def test_shutdown_delay_serves_on_while_not_ready_and_closing_connections(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    delay = 3.0
    proc, url = _toy_server(tmp_path, keys, {"TANDEM_SHUTDOWN_DELAY_S": str(delay)})
    try:
        body = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()
        status, headers, _ = request(url, "POST", p.infer_path("toy"), body)
        assert status == 200 and "Connection" not in headers  # keep-alive before the signal
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _until_not_ready(url)
        status, _, err = request(url, "GET", "/v2/health/ready")
        assert status == 503 and b"not ready" in err
        assert request(url, "GET", "/v2/health/live")[0] == 200
        # New connections are still accepted and answered; each answer closes its connection.
        for path, sent in ((p.infer_path("toy"), body), ("/v2/models/toy", None)):  # front door, then aiohttp
            status, headers, _ = request(url, "POST" if sent else "GET", path, sent)
            assert status == 200 and headers.get("Connection", "").lower() == "close", (path, headers)
        assert time.monotonic() - t0 < delay
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 >= delay * 0.9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_second_signal_ends_the_shutdown_delay(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    proc, url = _toy_server(tmp_path, keys, {"TANDEM_SHUTDOWN_DELAY_S": "120"})
    try:
        proc.send_signal(signal.SIGTERM)
        _until_not_ready(url)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_reference_config_loads_and_serves(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """examples/cloud/serve.toml: every key is a real setting (a misspelt one fails the start) and
    a server runs with it, CUDA listed first on a machine without it."""
    from cloud_support import ServerThread

    reference = Path(__file__).resolve().parents[1] / "examples" / "cloud" / "serve.toml"
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    config = load_config(reference, repository=repo, trusted_keys=[keys[1]], port=free_port(), access_log=False)
    assert config.shutdown_delay_s == 5 and config.read_timeout_s == 60
    assert config.batching_for("digits").fill_wait_us == 1500 and config.batching_for("toy").priority_levels == 2
    with ServerThread(config) as s:
        body = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()
        assert request(s.url, "POST", p.infer_path("toy"), body)[0] == 200


def test_access_lines_skip_the_log_queue_and_everything_is_restored_after() -> None:
    import logging

    from tandem.cloud.server import _log_off_the_loop

    root, access = logging.getLogger(), logging.getLogger("tandem.cloud.access")
    before = list(root.handlers)
    with _log_off_the_loop():
        assert [type(h).__name__ for h in root.handlers] == ["QueueHandler"]
        assert access.handlers == before and not access.propagate  # written by their own thread already
    assert root.handlers == before and access.handlers == [] and access.propagate
    # An app that configured the access logger itself keeps its configuration.
    mine = logging.NullHandler()
    access.addHandler(mine)
    try:
        with _log_off_the_loop():
            assert access.handlers == [mine] and access.propagate
    finally:
        access.removeHandler(mine)


def test_entries_that_are_not_bundles_are_named_with_the_fix(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    (repo / "raw").mkdir()
    (repo / "raw" / "model.onnx").write_bytes(b"x")
    (repo / "flat").mkdir()
    (repo / "flat" / "manifest.json").write_text("{}")
    (repo / "notes").mkdir()
    (repo / "loose.onnx").write_bytes(b"x")
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port)], stderr=log)
    try:
        _wait_ready(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert f"not served: {repo / 'raw'} holds ONNX files but no bundle; make one with `tandem build {repo / 'raw' / 'model.onnx'}" in text
    assert f"not served: {repo / 'flat'} holds a bundle directly; a bundle must sit in a version directory" in text
    assert f"not served: {repo / 'notes'} is not a model" in text
    assert f"not served: {repo / 'loose.onnx'} is a file, not a model directory" in text
    assert "Traceback" not in text


def test_the_worker_command_claims_as_many_jobs_as_the_worker_does_by_default() -> None:
    # The CLI stays cheap to import, so it repeats the worker's default rather than importing it.
    from tandem.cloud import worker
    from tandem.shared.cli import build_parser

    args = build_parser().parse_args(["worker", "--queue", "redis://127.0.0.1:6379/0"])
    assert args.claim == worker._CLAIM == 64
