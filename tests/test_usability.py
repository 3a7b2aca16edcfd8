"""What a newcomer meets first: help that says what a command does, errors that name the problem
where it is made, a status that does not contradict the command just run, and logs a machine reads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent_support import run_cli, write_config
from cloud_support import make_repository
from tandem.edge import Budget, HybridClient
from tandem.edge.policies import POLICIES
from tandem.edge.runtime import EdgeRuntime
from tandem.shared.bundle import load_bundle
from tandem.shared.errors import InvalidInput

pytestmark = pytest.mark.timeout(300)


def _tandem(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem.shared.cli", *args]


@pytest.mark.parametrize("action", ["inspect", "verify", "pack", "unpack"])
def test_every_bundle_action_describes_itself_and_its_arguments(action: str) -> None:
    out = run_cli("bundle", action, "--help")
    assert out.returncode == 0, out.stderr
    usage, _, rest = out.stdout.partition("\n\n")
    assert usage.startswith(f"usage: tandem bundle {action}")
    description = rest.split("\n\n")[0]
    # A sentence of its own between the usage line and the argument list, not just the argument list.
    assert not description.startswith(("positional arguments", "options")), out.stdout
    assert len(description.split()) >= 12, description
    # Every positional argument says what it is.
    positional = out.stdout.split("positional arguments:\n")[1].split("\n\n")[0]
    for line in positional.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            assert len(line.split()) > 1, f"{action}: argument without help: {line!r}"


def test_a_misspelt_policy_fails_where_the_budget_is_made() -> None:
    with pytest.raises(InvalidInput) as e:
        Budget(policy="cloud-onyl")
    msg = str(e.value)
    assert "'cloud-onyl'" in msg and all(name in msg for name in POLICIES)
    with pytest.raises(InvalidInput, match="policy name or an object"):
        Budget(policy=3)  # type: ignore[arg-type]
    for name in POLICIES:
        assert Budget(policy=name).policy == name


def test_a_wrong_shape_error_names_the_input_and_both_shapes(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    rt = EdgeRuntime(load_bundle(toy_bundle, [keys[1]]), warmup_runs=0)
    declared = rt.session.get_inputs()[0].shape
    with pytest.raises(InvalidInput) as e:
        rt.run({"input": np.zeros((1, 63), np.float32)})
    assert re.search(r"input 'input' has shape \[1, 63\]; the model expects \[[^,\]]+, 64\]", str(e.value)), (str(e.value), declared)
    with pytest.raises(InvalidInput, match=r"input 'input' has shape \[63\]; the model expects \[[^,\]]+, 64\]"):
        rt.run({"input": np.zeros((63,), np.float32)})
    # Through the client (its own fast path): onnxruntime's details, which came on a second line, are kept.
    with HybridClient(toy_bundle, trusted_keys=[keys[1]]) as c:
        with pytest.raises(InvalidInput) as e:
            c.infer(np.zeros((1, 63), np.float32))
    msg = str(e.value)
    assert "rejected the inputs" in msg and "Got: 63 Expected: 64" in msg and "input" in msg, msg
    assert "\n" not in msg and "[ONNXRuntimeError]" not in msg


def test_agent_status_says_starting_right_after_agent_run(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    data = tmp_path / "data"
    # No cloud is listening there: the agent starts (and serves its local API) all the same.
    config = write_config(tmp_path / "agent.json", "http://127.0.0.1:9", keys[1], data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_AGENT_")}
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen(_tandem("agent", "run", "--config", str(config)), stdout=log, stderr=subprocess.STDOUT, env=env)
    seen: list[str] = []
    try:
        # As a shell runs `tandem agent run --config C & tandem agent status --config C`: no pause between.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = run_cli("agent", "status", "--config", str(config))
            assert out.returncode == 0, out.stderr
            first = out.stdout.splitlines()[0]
            seen.append(first)
            if "running at" in first:
                break
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        assert "running at" in seen[-1], seen
        assert not any("not running" in s for s in seen), seen
        assert all("(starting, pid " in s for s in seen[:-1]), seen
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
        log.close()
    out = run_cli("agent", "status", "--config", str(config))
    assert "(not running)" in out.stdout, out.stdout
    assert not (data / "agent.starting").exists()


def test_agent_status_is_not_fooled_by_a_marker_left_by_a_killed_agent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (data / "agent.starting").write_text(f"{dead.pid}\n")
    out = run_cli("agent", "status", "--data", str(data), "--json")
    doc = json.loads(out.stdout)
    assert doc["running"] is False and doc["starting"] is False


def test_access_log_lines_are_json_lines(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """`tandem serve` logs to stderr with a text format; its access lines are JSON objects alone."""
    repo = make_repository(tmp_path / "repo", keys[0], toy_versions=("1",), slow=False, varlen=False)
    err_path = tmp_path / "serve.err"
    with open(err_path, "wb") as err:
        serve = subprocess.Popen(_tandem("serve", "--repository", str(repo), "--host", "127.0.0.1", "--port", "0",
                                         "--trusted-key", str(keys[1]), "--instances", "1"),
                                 stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert serve.stdout is not None
        url = None
        for line in serve.stdout:  # bounded: the server prints a few lines, then "ready URL"
            m = re.search(r"ready (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m[1]
                break
        assert url, err_path.read_text()
        for path in ("/v2/health/ready", "/v2/models/toy", "/v2/models/nope"):
            try:
                urllib.request.urlopen(url + path, timeout=30).read()
            except urllib.error.HTTPError as e:
                assert e.code == 404
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    lines = err_path.read_text().splitlines()
    access = [line for line in lines if '"request_id"' in line]
    assert len(access) >= 3, lines
    for line in access:
        doc = json.loads(line)  # the whole line: no time, level or logger name in front
        assert {"ts", "request_id", "method", "path", "status", "ms", "model", "version", "remote"} <= doc.keys()
    assert {json.loads(line)["path"] for line in access} >= {"/v2/health/ready", "/v2/models/toy", "/v2/models/nope"}
    # The other records keep their text format.
    assert any(re.match(r"\d{4}-\d\d-\d\d .* INFO tandem\.cloud", line) for line in lines), lines
