"""Monitoring under ``tandem serve --workers 2``: each worker profiles its share of the traffic,
/metrics (from either worker) sums the rows and shows the worst worker's score."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cloud_support import free_port, request
from tandem.shared import protocol as p
from test_monitor_support import make_digits_bundle, stream


def _metric(url: str, name: str, **labels: str) -> list[float]:
    text = request(url, "GET", "/metrics")[2].decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and all(w in line for w in want)]


def test_two_workers_profile_their_shares_and_metrics_combine_them(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    repo = tmp_path / "repo"
    make_digits_bundle(repo / "digits" / "1", keys[0])
    port = free_port()
    env = {**os.environ, "TANDEM_WORKERS": "2", "TANDEM_WARMUP_BATCH_SIZES": "[1]", "TMPDIR": str(tmp_path),
           "TANDEM_MONITORING__MAX_CPU_SHARE": "1", "TANDEM_MONITORING__INTERVAL_S": "0.2", "TANDEM_ACCESS_LOG": "false"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.cloud", "--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"server exited early: {(tmp_path / 'serve.log').read_text()[-2000:]}"
            if line.startswith("ready "):
                break
        x, _ = stream("noise", 1200, seed=31)
        bodies = [p.InferRequest({"input": x[i : i + 1]}).to_wire() for i in range(len(x))]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # a new connection per call: both workers serve
            statuses = list(pool.map(lambda b: request(url, "POST", p.infer_path("digits"), b, timeout=30)[0], bodies))
        assert statuses == [200] * 1200

        def combined() -> bool:
            return _metric(url, "tandem_input_quality_rows", check="rows", model="digits") == [1200.0]

        deadline = time.monotonic() + 60
        while not combined() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert combined(), _metric(url, "tandem_input_quality_rows", check="rows", model="digits")
        deadline = time.monotonic() + 60
        while _metric(url, "tandem_drift_drifting", model="digits") != [1.0] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(url, "tandem_drift_drifting", model="digits") == [1.0]
        assert _metric(url, "tandem_drift_score", model="digits")[0] >= 0.25
        # Either worker answers the endpoint with its own share.
        status, _, raw = request(url, "GET", "/v1/monitor/digits")
        doc = json.loads(raw)
        assert status == 200 and doc["drifting"] and 0 < doc["input_quality"]["rows"] <= 1200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            log.close()
    assert proc.returncode == 0
    assert not re.search(r"Traceback", (tmp_path / "serve.log").read_text())
