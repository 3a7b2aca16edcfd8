"""The cloud tier's drift monitor end to end: a real server, real requests, the JSON endpoint,
the Prometheus gauges, live quality from feedback and route records, and the webhook."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_support import ServerThread, request
from support import free_port, make_bundle
from tandem.cloud.config import ServerConfig
from test_monitor_support import make_digits_bundle, stream


class Hook:
    """A webhook receiver on 127.0.0.1 (stdlib, its own thread): keeps every JSON body posted."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                outer.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], hook: Hook) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("repo")
    make_digits_bundle(repo / "digits" / "1", keys[0])
    make_bundle(repo / "toy" / "1", keys[0])  # no reference profile: served, not monitored
    config = ServerConfig(
        repository=repo, trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1], access_log=False,
        monitoring={"interval_s": 0.1, "max_cpu_share": 1.0, "webhook_url": hook.url, "webhook_attempts": 2},
    )
    with ServerThread(config) as s:
        yield s


def _infer(server: ServerThread, x: np.ndarray, model: str = "digits") -> list[int]:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})
    status, _, raw = request(server.url, "POST", f"/v2/models/{model}/infer", body.encode(), {"Content-Type": "application/json"})
    assert status == 200, raw
    logits = np.asarray(json.loads(raw)["outputs"][0]["data"]).reshape(len(x), -1)
    return logits.argmax(1).tolist()


def _monitor(server: ServerThread, path: str = "/v1/monitor/digits") -> tuple[int, dict[str, Any]]:
    status, _, raw = request(server.url, "GET", path)
    return status, json.loads(raw)


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_clean_then_noisy_traffic_marks_the_model_drifting_and_calls_the_webhook(server: ServerThread, hook: Hook) -> None:
    clean, _ = stream(None, 800, seed=5)
    for i in range(0, len(clean), 8):  # 100 requests of 8 rows: every row profiled (rows_per_batch 16)
        _infer(server, clean[i : i + 8])
    # The instance thread profiles a batch right after its answers leave: poll for the last one.
    _wait(lambda: _monitor(server)[1].get("window_rows") == 800, "800 rows profiled")
    status, doc = _monitor(server)
    assert status == 200, doc
    assert doc["window_rows"] == 800 and doc["score"] is not None and doc["score"] < doc["threshold"] and not doc["drifting"]
    assert doc["input_quality"]["rows"] == 800 and doc["input_quality"]["out_of_range"] == 0
    assert doc["validation"]["agreement"] > 0.8 and doc["overhead"]["profile_bytes"] < 1 << 20

    noisy, _ = stream("noise", 400, seed=6)
    for i in range(0, len(noisy), 8):
        _infer(server, noisy[i : i + 8])
    _wait(lambda: _monitor(server)[1]["input_quality"]["rows"] == 1200, "1200 rows profiled")
    status, doc = _monitor(server)
    assert doc["drifting"] and doc["score"] >= doc["threshold"] and doc["drifting_since"] is not None
    top = doc["features"][0]
    assert top["name"].startswith("input[") and top["psi"] >= doc["threshold"]
    assert {h["name"] for h in doc["histograms"]} >= {top["name"]}
    _wait(lambda: any(b["event"] == "drift_started" and b["model"] == "digits" for b in hook.bodies), "the webhook")
    body = next(b for b in hook.bodies if b["event"] == "drift_started")
    assert body["version"] == "1" and body["score"] >= body["threshold"] and body["top_features"]

    _, _, metrics = request(server.url, "GET", "/metrics")
    text = metrics.decode()
    assert 'tandem_drift_drifting{model="digits",version="1"} 1.0' in text
    assert 'tandem_drift_score{model="digits",version="1"}' in text
    assert text.count("tandem_drift_feature_psi{") == 5  # monitoring.top_features: bounded labels
    assert 'tandem_input_quality_rows{check="rows",model="digits",version="1"} 1200.0' in text

    # Clean traffic again: once it fills the window the model stops drifting, and the webhook says so.
    clean, _ = stream(None, 1000, seed=10)
    for i in range(0, len(clean), 8):
        _infer(server, clean[i : i + 8])
    _wait(lambda: _monitor(server)[1]["input_quality"]["rows"] == 2200, "2200 rows profiled")
    status, doc = _monitor(server)
    assert not doc["drifting"] and doc["score"] < doc["threshold"]
    _wait(lambda: any(b["event"] == "drift_stopped" for b in hook.bodies), "the webhook's drift_stopped")


async def test_webhook_gives_up_after_its_attempts(tmp_path: Path) -> None:
    from tandem.cloud.config import MonitoringConfig
    from tandem.cloud.monitor import Monitoring

    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    monitoring = Monitoring(MonitoringConfig(webhook_url=dead, webhook_attempts=2, webhook_timeout_s=2), None, None)
    t0 = time.monotonic()
    await monitoring._post({"event": "drift_started", "model": "m", "version": "1"})
    await monitoring.close()
    assert time.monotonic() - t0 < 10  # two attempts and their backoff, then it stops
    (entry,) = monitoring.webhook_log
    assert isinstance(entry["outcome"], str) and "Connect" in entry["outcome"]


def test_live_quality_from_feedback_labels_and_agent_route_records(server: ServerThread) -> None:
    x, y = stream(None, 40, seed=7)
    predicted = _infer(server, x[:20]) + _infer(server, x[20:])
    records = [{"id": str(uuid.uuid4()), "kind": "feedback", "model": "digits", "version": "1", "label": str(int(label)),
                "payload": {"prediction": str(p), "tier": "cloud"}, "created_at": time.time()}
               for p, label in zip(predicted, y)]
    records += [{"id": str(uuid.uuid4()), "kind": "route", "model": "digits", "version": "1",
                 "payload": {"tier": "cloud", "edge_agrees": i % 4 != 0}, "created_at": time.time()} for i in range(20)]
    status, _, raw = request(server.url, "POST", "/v1/feedback", json.dumps({"records": records}).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200, raw
    expected = float(np.mean(np.asarray(predicted) == y))

    def quality() -> dict[str, Any]:
        return _monitor(server)[1]["live_quality"]

    _wait(lambda: quality().get("labelled") == 40 and quality().get("escalations_compared") == 20, "the feedback")
    q = quality()
    assert q["accuracy"] == pytest.approx(expected) and q["escalation_agreement"] == pytest.approx(0.75)
    _, _, metrics = request(server.url, "GET", "/metrics")
    assert 'tandem_live_quality{measure="escalation_agreement",model="digits",version="1"} 0.75' in metrics.decode()


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/v1/monitor/nope", 404, "nope"),
    ("/v1/monitor/toy", 404, "no reference profile"),
    ("/v1/monitor/digits/versions/9", 404, "9"),
    ("/v1/monitor/digits?top=abc", 400, "top"),
    ("/v1/monitor/digits?top=0", 400, "top"),
    ("/v1/monitor/..%2F..%2Fetc", 404, ""),
])
def test_bad_monitor_requests_are_4xx_with_the_usual_body(server: ServerThread, path: str, status: int, message: str) -> None:
    got, doc = _monitor(server, path)
    assert got == status and doc["code"] and message in doc["error"]


def test_monitor_list_names_every_served_model(server: ServerThread) -> None:
    status, doc = _monitor(server, "/v1/monitor")
    assert status == 200 and doc["enabled"] and doc["threshold"] == 0.25
    rows = {r["model"]: r for r in doc["models"]}
    assert rows["digits"]["monitored"] and not rows["toy"]["monitored"]


def test_monitoring_off_serves_and_says_why(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    make_digits_bundle(tmp_path / "repo" / "digits" / "1", keys[0])
    config = ServerConfig(repository=tmp_path / "repo", trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1],
                          access_log=False, monitoring={"enabled": False})
    with ServerThread(config) as s:
        x, _ = stream(None, 8, seed=8)
        _infer(s, x)
        status, doc = _monitor(s)
        assert status == 404 and "monitoring is off" in doc["error"]
        _, _, metrics = request(s.url, "GET", "/metrics")
        assert b"tandem_drift_score{" not in metrics


def test_bad_monitoring_config_is_refused() -> None:
    with pytest.raises(ValueError, match="min_rows"):
        ServerConfig(repository=".", monitoring={"window": 100, "min_rows": 200})
    with pytest.raises(ValueError, match="webhook_url"):
        ServerConfig(repository=".", monitoring={"webhook_url": "file:///etc/passwd"})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem.shared.cli", "monitor", *args], capture_output=True, text=True, timeout=120, check=False)


def test_tandem_monitor_reports_and_plots_a_server(server: ServerThread, tmp_path: Path) -> None:
    x, _ = stream(None, 8, seed=9)
    _infer(server, x)
    out = tmp_path / "m.png"
    run = _cli(server.url, "--out", str(out), "--top", "2")  # the only monitored model: no --model needed
    assert run.returncode == 0, run.stderr
    assert "digits:1 (cloud):" in run.stdout and "drift score" in run.stdout and f"plot: {out}" in run.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    run = _cli(server.url, "--model", "digits", "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["model"] == "digits"


@pytest.mark.parametrize(("args", "message"), [
    (["http://127.0.0.1:1"], "cannot reach"),
    (["{url}", "--model", "toy"], "no reference profile"),
    (["{url}", "--model", "nope"], "nope"),
    (["{url}", "--top", "0"], "--top"),
    (["{tmp}/nowhere"], "neither a server URL"),
    (["{tmp}/bad.json"], "not a monitor file"),
])
def test_tandem_monitor_bad_input_is_one_line_and_exit_1(server: ServerThread, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text("[1, 2]")
    run = _cli(*(a.format(url=server.url, tmp=tmp_path) for a in args))
    assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr
