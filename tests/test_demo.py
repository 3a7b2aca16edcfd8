"""`tandem demo --quick` end to end, twice: the second run reuses the bundle, and no process survives."""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

# Generous: the quick build alone is ~20 s on an idle 2-core machine but minutes on a loaded one.
pytestmark = pytest.mark.timeout(900)


def _closed(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def _demo(work: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the demo; past ``timeout`` it gets SIGTERM (it then stops its own children) and the test fails."""
    proc = subprocess.Popen([sys.executable, "-m", "tandem.shared.cli", "demo", "--quick", "--work", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"tandem demo --quick took over {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_demo_runs_end_to_end_twice_without_rebuilding(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    first = _demo(work)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    out = first.stdout
    assert "building digits" in out and "demo OK: 0 failed calls" in out
    # The build shows its progress: each step as it ends, and the epochs of each training.
    assert re.search(r"^\s+\d+ s  trained the cloud's model", out, re.M), out
    assert re.search(r"^\s+\d+ s  calibrated the cascade's confidence threshold", out, re.M), out
    assert re.search(r"^\s+teacher: epoch \d+/\d+, validation accuracy 0\.\d+$", out, re.M), out
    for phase in ("edge-only", "cloud-only", "cascade", "constrained", "cascade+outage"):
        assert re.search(rf"^{re.escape(phase)}\s+\d+\s+0\.\d+", out, re.M), f"no report row for {phase}"
    assert re.search(r"outage: the cloud was partitioned .* 0 failed", out)
    # Words that say what each policy does with this bundle, the price and its unit, no placeholders.
    flat = " ".join(out.split())
    assert "the tier with the best expected accuracy that fits the call's budget" in flat and "cheapest" not in flat
    assert "Price: $0.001 per cloud call" in flat and "cost $" in out
    assert re.search(r"phase cascade edge first: an answer goes to the cloud when|phase cascade edge first: the edge's "
                     r"answer is kept when its confidence \(max softmax\) is at least 0\.\d+", flat), flat
    assert re.search(r"calibrat\w+ .*validation inputs", flat), flat
    assert not re.search(r"\bN\b", out), "a placeholder N in the output"
    png = (work / "demo-report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert struct.unpack(">II", png[16:24]) == (1400, 950)  # the four-panel report, not an empty figure
    assert list((work / "repository" / "digits").glob("*/manifest.json"))
    # Every process it started is gone: the cloud and agent ports are closed, the agent cleaned up.
    urls = re.findall(r"on (http://127\.0\.0\.1:\d+)", out)
    assert len(urls) == 2 and all(_closed(u) for u in urls)
    assert not (work / "agent" / "agent.json").exists()

    second = _demo(work)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "built before" in second.stdout and "building digits" not in second.stdout
    assert len(list((work / "repository" / "digits").glob("*/manifest.json"))) == 1

    # Interrupted mid-workload (SIGTERM as a supervisor sends; Ctrl-C takes the same path): no orphans.
    proc = subprocess.Popen([sys.executable, "-m", "tandem.shared.cli", "demo", "--quick", "--work", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # bounded: the demo prints ~15 lines before its workload
        lines.append(line)
        if "[4/5]" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(60) == 130, out
    assert "interrupted" in out and "stopped every process" in out
    urls = re.findall(r"on (http://127\.0\.0\.1:\d+)", out)
    assert len(urls) == 2 and all(_closed(u) for u in urls), out
