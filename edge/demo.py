"""``tandem demo``: the whole system on this machine, end to end, on embedded defaults.

1. keys (``tandem keygen``) and the digits bundle (``tandem build examples/digits``) in the work
   directory, unless they are already there (a second run does not rebuild);
2. the cloud tier (``tandem serve``) on a free 127.0.0.1 port, behind a :class:`FaultProxy` that adds
   a realistic network latency;
3. an edge agent (``tandem agent run``) that installs the edge variant from the cloud's registry;
4. the digits test split through the agent's local API under a few budgets and policies, with a cloud
   outage (network partition) in the middle of one phase, and the labels sent back as feedback;
5. a report (accuracy, cloud share, cost, latency percentiles, what happened during the outage),
   ``WORK/demo-report.png``, and every process stopped (also on Ctrl-C or an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.shared.errors import TandemError, Unavailable

MODEL = "digits"


@dataclass
class Call:
    phase: str
    t: float  # seconds since the workload started
    status: int
    correct: bool
    tier: str
    reason: str
    cost: float
    latency_ms: float
    outage: bool
    fallbacks: tuple[str, ...] = ()


@dataclass
class Phase:
    name: str
    budget: dict[str, Any]
    description: str
    outage: bool = False
    calls: list[Call] = field(default_factory=list)


def _checkout() -> Path:
    here = Path(__file__).resolve().parents[1]
    if not (here / "examples" / "digits" / "spec.py").is_file():
        raise TandemError(
            f"tandem demo needs the examples/ folder of a Tandem checkout (looked in {here}); "
            "run it from a `pip install -e .` checkout"
        )
    return here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """Child processes with log files; all stopped (TERM, then KILL) on exit, whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.procs.append((name, proc, log))
        return proc

    def log_tail(self, name: str, n: int = 30) -> str:
        try:
            lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])

    def check(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            raise Unavailable(f"{name} exited with code {proc.returncode}; its log ({self.logs / (name + '.log')}) ends:\n"
                              + self.log_tail(name))

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, log in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
        self.procs.clear()


def _tandem(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem.shared.cli", *args]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _ensure_bundle(work: Path, checkout: Path, quick: bool, rebuild: bool, procs: _Processes) -> tuple[Path, Path]:
    keys, repo = work / "keys", work / "repository"
    priv, pub = keys / "tandem.key", keys / "tandem.pub"
    if not priv.exists():
        subprocess.run(_tandem("keygen", "--out", str(keys)), check=True, stdout=subprocess.DEVNULL)
    existing = sorted((repo / MODEL).glob("*/manifest.json")) if (repo / MODEL).is_dir() else []
    if existing and not rebuild:
        _say(f"[1/5] bundle: using {existing[-1].parent} (built before; --rebuild to build again)")
        return repo, pub
    _say(f"[1/5] bundle: building {MODEL} with `tandem build examples/digits{' --quick' if quick else ''}` "
         f"(log: {procs.logs / 'build.log'}) ...")
    t0 = time.monotonic()
    argv = _tandem("build", str(checkout / "examples" / "digits"), "--repository", str(repo), "--key", str(priv),
                   "--no-progress") + (["--quick"] if quick else [])
    proc = procs.start("build", argv)
    if proc.wait() != 0:
        raise TandemError(f"tandem build failed (exit {proc.returncode}); its log ends:\n" + procs.log_tail("build"))
    _say(f"      built in {time.monotonic() - t0:.0f} s")
    return repo, pub


async def _wait_http(url: str, proc: subprocess.Popen[bytes], name: str, procs: _Processes, timeout: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while time.monotonic() < deadline:
            procs.check(name, proc)
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(0.2)
    raise Unavailable(f"{name} was not ready at {url} after {timeout:.0f} s; its log ends:\n" + procs.log_tail(name))


def _load_test_split(checkout: Path) -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.spec_from_file_location("tandem_demo_digits_spec", checkout / "examples" / "digits" / "spec.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = mod.load_data()["test"]
    return np.asarray(x, np.float32), np.asarray(y)


async def _workload(agent_url: str, proxy: Any, phases: list[Phase], x: np.ndarray, y: np.ndarray,
                    outage_s: float) -> dict[str, Any]:
    import aiohttp

    from tandem.shared.protocol import CONTENT_TYPE
    from tandem.shared.tensors import decode_tensors, encode_tensors, packb, unpackb

    t_start = time.monotonic()
    outage: dict[str, Any] = {}
    feedback: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:

        async def call(phase: Phase, i: int, during: bool) -> None:
            j = i % len(x)
            msg = {"id": f"{phase.name}-{i}", "inputs": encode_tensors({"input": x[j:j + 1]}), "parameters": phase.budget}
            t0 = time.perf_counter()
            async with s.post(f"{agent_url}/v1/models/{MODEL}/infer", data=packb(msg),
                              headers={"Content-Type": CONTENT_TYPE}) as r:
                body = unpackb(await r.read())
                status = r.status
            ms = (time.perf_counter() - t0) * 1e3
            t = time.monotonic() - t_start
            if status == 200:
                outs = decode_tensors(body["outputs"])
                scores = outs.get("logits", next(iter(outs.values())))
                route = body.get("route", {})
                phase.calls.append(Call(phase.name, t, 200, int(np.argmax(scores)) == int(y[j]), str(route.get("tier")),
                                        str(route.get("reason", "")), float(route.get("cost") or 0.0), ms, during,
                                        tuple(str(f) for f in route.get("fallbacks") or ())))
                feedback.append({"kind": "feedback", "model": MODEL, "version": body.get("model_version"),
                                 "request_id": msg["id"], "label": int(y[j])})
            else:
                phase.calls.append(Call(phase.name, t, status, False, "failed", str(body.get("error", ""))[:80], 0.0, ms, during))
            if len(feedback) >= 50:
                await _post_feedback(s, agent_url, feedback)

        for phase in phases:
            _say(f"      phase {phase.name:<16} {phase.description}")
            if not phase.outage:
                for i in range(len(x)):
                    await call(phase, i, False)
                continue
            for i in range(len(x) // 3):
                await call(phase, i, False)
            # The outage: a partition (silence, as with a cut cable) for outage_s, calls keep coming.
            proxy.set(partition=True)
            outage["start"] = time.monotonic() - t_start
            i = len(x) // 3
            t_end = time.monotonic() + outage_s
            while time.monotonic() < t_end and i < 20 * len(x):  # bounded in time and count
                await call(phase, i, True)
                if i % 20 == 0:
                    st = await _get_json(s, f"{agent_url}/v1/status")
                    outage["max_outbox_depth"] = max(outage.get("max_outbox_depth", 0), st["outbox"]["depth"])
                i += 1
            proxy.set(partition=False)
            await proxy.drop_connections()  # connections opened during the partition never recover
            outage["end"] = time.monotonic() - t_start
            for k in range(len(x) // 3):
                await call(phase, i + k, False)
        await _post_feedback(s, agent_url, feedback)
    return outage


async def _post_feedback(s: Any, url: str, records: list[dict[str, Any]]) -> None:
    if records:
        async with s.post(f"{url}/v1/feedback", json={"records": records}) as r:
            if r.status != 200:
                raise TandemError(f"the agent refused feedback: {await r.text()}")
        records.clear()


async def _get_json(s: Any, url: str) -> Any:
    async with s.get(url) as r:
        return await r.json()


async def _count_cloud_feedback(cloud_url: str) -> int:
    import aiohttp

    n, after = 0, 0
    async with aiohttp.ClientSession() as s:
        while True:
            doc = await _get_json(s, f"{cloud_url}/v1/feedback?model={MODEL}&kind=feedback&limit=1000&after={after}")
            n += len(doc["records"])
            if not doc["records"] or doc.get("next_after") is None:
                return n
            after = doc["next_after"]


def _best_cascade_accuracy(repo: Path) -> float:
    """The best accuracy the cascade reached in calibration (the demo asks for it)."""
    from tandem.shared.bundle import read_manifest, version_key

    versions = sorted((p.parent.name for p in (repo / MODEL).glob("*/manifest.json")), key=version_key)
    _, m = read_manifest(repo / MODEL / versions[-1])
    if m.calibration is None:
        return 0.9
    return max(p.cascade_accuracy for p in m.calibration.points)


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) if v else float("nan")


def _report(phases: list[Phase], outage: dict[str, Any], delivered: tuple[int, int], out_png: Path) -> str:
    rows = [f"{'phase':<24}{'calls':>6}{'accuracy':>10}{'cloud':>8}{'cost':>9}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"]
    for p in phases:
        ok = [c for c in p.calls if c.status == 200]
        acc = np.mean([c.correct for c in ok]) if ok else float("nan")
        cloud = np.mean([c.tier == "cloud" for c in ok]) if ok else float("nan")
        lat = [c.latency_ms for c in p.calls]
        rows.append(f"{p.name:<24}{len(p.calls):>6}{acc:>10.3f}{cloud:>8.1%}{sum(c.cost for c in ok):>9.3f}"
                     f"{_pct(lat, 50):>9.1f}{_pct(lat, 99):>9.1f}{len(p.calls) - len(ok):>8}")
    during = [c for p in phases for c in p.calls if c.outage]
    lines = ["", "\n".join(rows), ""]
    if during:
        tiers = {t: sum(c.tier == t for c in during) for t in ("edge", "cloud", "failed")}
        fell_back = [c for c in during if c.fallbacks]
        why: dict[str, int] = {}
        for c in fell_back:
            for f in c.fallbacks:
                f = re.sub(r"\d+(\.\d+)?", "N", f)  # "77.8 ms left < 89.0 ms needed" and the like, grouped
                why[f] = why.get(f, 0) + 1
        top = "; ".join(f"{k} ×{v}" for k, v in sorted(why.items(), key=lambda kv: -kv[1])[:3]) or "-"
        lines.append(f"outage: the cloud was partitioned for {outage['end'] - outage['start']:.1f} s while {len(during)} calls "
                     f"came in: {tiers['edge']} answered on the edge, {tiers['cloud']} by the cloud, {tiers['failed']} failed "
                     f"(p99 {_pct([c.latency_ms for c in during], 99):.0f} ms).")
        lines.append(f"        {len(fell_back)} calls the router sent to the cloud fell back to the edge within their budget "
                     f"(why: {top}).")
        lines.append(f"        The agent's outbox held up to {outage.get('max_outbox_depth', 0)} records (routes, telemetry, "
                     f"feedback) meanwhile; {delivered[0]}/{delivered[1]} feedback records of this run reached the cloud after it came back.")
    lines.append(f"plot: {out_png}")
    _plot(phases, outage, out_png)
    return "\n".join(lines)


def _plot(phases: list[Phase], outage: dict[str, Any], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    names = [p.name for p in phases]
    accs = [np.mean([c.correct for c in p.calls if c.status == 200] or [np.nan]) for p in phases]
    shares = [np.mean([c.tier == "cloud" for c in p.calls if c.status == 200] or [np.nan]) for p in phases]
    xs = np.arange(len(names))
    ax1.bar(xs - 0.2, accs, 0.4, label="accuracy")
    ax1.bar(xs + 0.2, shares, 0.4, label="cloud share")
    ax1.set_xticks(xs, names, rotation=25, ha="right")
    ax1.set_ylim(0, 1.05)
    ax1.legend(loc="lower right")
    ax1.set_title("per phase")
    colors = {"edge": "tab:green", "cloud": "tab:blue", "failed": "tab:red"}
    for tier, color in colors.items():
        pts = [(c.t, c.latency_ms) for p in phases for c in p.calls if c.tier == tier]
        if pts:
            t, ms = zip(*pts)
            ax2.scatter(t, ms, s=6, color=color, label=tier)
    if "start" in outage:
        ax2.axvspan(outage["start"], outage.get("end", outage["start"]), color="tab:red", alpha=0.12, label="cloud outage")
    ax2.set_yscale("log")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("call latency (ms, via the agent)")
    ax2.legend(loc="upper right", markerscale=3)
    ax2.set_title("every call, by tier")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


async def _demo(work: Path, quick: bool, rebuild: bool, cloud_latency_ms: float, procs: _Processes) -> int:
    from tandem.edge.faultproxy import FaultProxy

    checkout = _checkout()
    repo, pub = _ensure_bundle(work, checkout, quick, rebuild, procs)

    cloud_port = _free_port()
    cloud_url = f"http://127.0.0.1:{cloud_port}"
    _say(f"[2/5] cloud: `tandem serve` on {cloud_url} (log: {procs.logs / 'serve.log'})")
    serve = procs.start("serve", _tandem("serve", "--repository", str(repo), "--host", "127.0.0.1", "--port", str(cloud_port),
                                         "--trusted-key", str(pub), "--instances", "1"))
    await _wait_http(f"{cloud_url}/v2/health/ready", serve, "serve", procs, timeout=120)
    proxy = FaultProxy(("127.0.0.1", 0), ("127.0.0.1", cloud_port), seed=0)
    await proxy.start()
    proxy.set(latency_ms=cloud_latency_ms, jitter_ms=cloud_latency_ms / 10)
    try:
        agent_dir = work / "agent"
        cfg = {"cloud_url": proxy.url, "trusted_keys": [str(pub)], "data_dir": str(agent_dir),
               "models": [{"name": MODEL}], "port": _free_port(), "poll_interval_s": 5, "upload_interval_s": 0.5,
               "upload_max_backoff_s": 2, "telemetry_interval_s": 5, "policy": "cascade",
               "router": {"cloud_cost_per_call": 0.001}}
        (work / "agent.json").write_text(json.dumps(cfg, indent=2))
        agent_url = f"http://127.0.0.1:{cfg['port']}"
        _say(f"[3/5] edge agent: `tandem agent run --config {work / 'agent.json'}` on {agent_url} "
             f"(cloud via a fault proxy adding {cloud_latency_ms:g} ms; log: {procs.logs / 'agent.log'})")
        agent = procs.start("agent", _tandem("agent", "run", "--config", str(work / "agent.json")))
        await _wait_http(f"{agent_url}/v2/health/ready", agent, "agent", procs, timeout=120)

        x, y = _load_test_split(checkout)
        n = 60 if quick else len(x)
        x, y = x[:n], y[:n]
        slo = max(4 * cloud_latency_ms, 50.0)
        target = _best_cascade_accuracy(repo)
        phases = [
            Phase("edge-only", {"policy": "edge-only"}, "every call on the device"),
            Phase("cloud-only", {"policy": "cloud-only", "latency_ms": 2000}, "every call in the cloud"),
            Phase("cascade", {"policy": "cascade", "target_accuracy": target},
                  f"edge first; answers less sure than needed for {target:.3f} accuracy go to the cloud"),
            Phase("constrained", {"policy": "constrained", "latency_ms": slo, "max_cost": 0.001},
                  f"cheapest tier that meets {slo:g} ms and costs <= 0.001"),
            Phase("cascade+outage", {"policy": "cascade", "target_accuracy": target, "latency_ms": slo},
                  f"the same with a {slo:g} ms budget; the cloud is partitioned for a while", outage=True),
        ]
        baseline = await _count_cloud_feedback(cloud_url)  # the cloud's store outlives a demo run
        _say(f"[4/5] workload: {n} digits test inputs per phase through the agent's local API")
        outage = await _workload(agent_url, proxy, phases, x, y, outage_s=2.0 if quick else 5.0)

        # Store-and-forward: everything the agent held during the outage reaches the cloud.
        expected = sum(1 for p in phases for c in p.calls if c.status == 200)
        deadline = time.monotonic() + 30
        got = 0
        while time.monotonic() < deadline:
            got = await _count_cloud_feedback(cloud_url) - baseline
            if got >= expected:
                break
            await asyncio.sleep(0.5)
        _say("[5/5] report")
        report = _report(phases, outage, (got, expected), work / "demo-report.png")
        _say(report)
        status = subprocess.run(_tandem("agent", "status", "--data", str(agent_dir)), capture_output=True, text=True)
        _say("\n`tandem agent status`:\n" + status.stdout.rstrip())
        failed = sum(1 for p in phases for c in p.calls if c.status != 200)
        if failed or got < expected:
            _say(f"\nDEMO FAILED: {failed} failed calls, {got}/{expected} feedback records delivered")
            return 1
        _say("\ndemo OK: 0 failed calls, every feedback record delivered")
        return 0
    finally:
        await proxy.stop()


def run_demo(work: Path, *, quick: bool = False, rebuild: bool = False, cloud_latency_ms: float = 20.0) -> int:
    work = work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    procs = _Processes(work / "logs")
    t0 = time.monotonic()

    def _interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    async def main() -> int | None:
        # While the event loop runs, SIGTERM and SIGINT cancel the demo's task: an exception raised
        # by a signal handler at an arbitrary point of the loop's own code can leave it unable to
        # stop cleanly. None means "interrupted".
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        interrupted: list[int] = []

        def stop() -> None:
            if not interrupted:
                interrupted.append(1)
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            return await _demo(work, quick, rebuild, cloud_latency_ms, procs)
        except asyncio.CancelledError:
            if interrupted:
                return None
            raise

    # SIGTERM (a supervisor, `timeout`) must clean up like Ctrl-C does: no orphaned servers.
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        code = asyncio.run(main())
        if code is None:
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        # The loop's handlers are gone once it closed; stopping the children must not be cut short.
        signal.signal(signal.SIGTERM, _interrupted)
        with contextlib.suppress(KeyboardInterrupt):
            procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        _say(f"stopped every process; demo took {time.monotonic() - t0:.0f} s (work dir {work})")
