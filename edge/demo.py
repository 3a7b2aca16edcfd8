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
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.shared.errors import TandemError, Unavailable

MODEL = "digits"
#: What the demo's agent is told one cloud call costs, in US dollars (an example price: the router
#: only compares it with budgets and sums it; the unit is whatever the operator configures).
PRICE = 0.001


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

    def start_piped(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """A child whose output the caller reads from ``proc.stdout`` (and copies to its log itself)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, None))
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
        for _, proc, log in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if log is not None:
                log.close()
        self.procs.clear()


def _tandem(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem.shared.cli", *args]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _say_wrapped(msg: str, indent: str = "      ") -> None:
    """A long line wrapped to the terminal's usual width; paths and URLs are never split."""
    _say(textwrap.fill(msg, width=110, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False))


async def _ensure_bundle(work: Path, checkout: Path, quick: bool, rebuild: bool, procs: _Processes) -> tuple[Path, Path]:
    keys, repo = work / "keys", work / "repository"
    priv, pub = keys / "tandem.key", keys / "tandem.pub"
    if not priv.exists():
        from tandem.shared.signing import generate_keypair

        generate_keypair(keys)  # what `tandem keygen --out WORK/keys` does
    existing = sorted((repo / MODEL).glob("*/manifest.json")) if (repo / MODEL).is_dir() else []
    if existing and not rebuild:
        _say(f"[1/5] bundle: using {existing[-1].parent} (built before; --rebuild to build again)")
        return repo, pub
    _say_wrapped(f"[1/5] bundle: building {MODEL} with `tandem build examples/digits{' --quick' if quick else ''}`: train a CNN "
         "(the cloud's model) and a small MLP (the edge's), quantize, measure, calibrate the cascade, sign. "
         f"Once only; {'about a minute' if quick else 'a few minutes'} on 2 cores (log: {procs.logs / 'build.log'})")
    t0 = time.monotonic()
    argv = _tandem("build", str(checkout / "examples" / "digits"), "--repository", str(repo), "--key", str(priv)) \
        + (["--quick"] if quick else [])
    proc = procs.start_piped("build", argv)
    code = await _follow(proc, procs.logs / "build.log", _BuildProgress(sys.stdout.isatty()))
    if code != 0:
        raise TandemError(f"tandem build failed (exit {code}); its log ends:\n" + procs.log_tail("build"))
    _say(f"      built in {time.monotonic() - t0:.0f} s")
    return repo, pub


class _BuildProgress:
    """Turns the build's output (step lines and tqdm's epoch bars) into a few lines for a person.

    On a terminal the current epoch is one line rewritten in place; elsewhere (a log, a pipe) a bar
    prints at most four lines, at each quarter of its epochs.
    """

    _STEP = re.compile(r"^\[\s*([\d.]+)s\] (.+) done$")
    # "teacher:  30%|███       | 3/10 [00:01<00:03,  2.00epoch/s, loss=0.21, train=0.93, val=0.95]"
    _BAR = re.compile(r"^(?P<desc>[^:|]+):\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<info>[^\]]*)\]")
    _WHAT = {"train teacher": "trained the cloud's model (teacher CNN)",
             "teacher": "trained the cloud's model (teacher CNN)",
             "train students": "trained the edge's model (student MLP, with and without distillation)",
             "train edge model": "trained the edge's model",
             "export + check": "exported both to ONNX and checked them against torch",
             "export check": "exported both to ONNX and checked them against torch",
             "quantize": "made the int8 / fp16 variants",
             "evaluate": "measured every variant's accuracy and latency on the test split",
             "calibrate + seal": "calibrated the cascade's confidence threshold, signed the bundle"}

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self._quarter: dict[str, int] = {}
        self._open = False  # a progress line is on the terminal, not yet ended

    def __call__(self, fragment: str) -> None:
        text = fragment.strip()
        bar = self._BAR.match(text)
        if bar:
            n, total = int(bar["n"]), int(bar["total"])
            val = re.search(r"val=([\d.]+)", bar["info"])
            line = f"      {bar['desc'].strip()}: epoch {n}/{total}" + (f", validation accuracy {val[1]}" if val else "")
            if self.tty:
                sys.stdout.write("\r" + line.ljust(78)[:100])
                sys.stdout.flush()
                self._open = True
            elif total and n * 4 // total > self._quarter.get(bar["desc"], 0):
                self._quarter[bar["desc"]] = n * 4 // total
                _say(line)
            return
        step = self._STEP.match(text)
        if step or text.startswith(("warning:", "error:")):
            if self._open:
                sys.stdout.write("\r" + " " * 100 + "\r")
                self._open = False
            if step:
                name = step[2]
                _say(f"      {float(step[1]):5.0f} s  {self._WHAT.get(name, name)}")
            else:
                _say(f"      {text}")


async def _follow(proc: subprocess.Popen[bytes], log_path: Path, show: Any) -> int:
    """Copy a child's output to its log and hand each line (or ``\\r``-separated update) to ``show``,
    without blocking the event loop (so Ctrl-C or SIGTERM still stop the demo mid-build)."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not finished.done():
            finished.set_result(None)

    def pump() -> None:
        out = proc.stdout
        assert isinstance(out, io.BufferedReader)  # Popen(stdout=PIPE), unbuffered text off
        pending = b""
        try:
            with open(log_path, "wb") as log:
                while chunk := out.read1(65536):
                    log.write(chunk)
                    log.flush()
                    pending += chunk
                    *parts, pending = re.split(rb"[\r\n]", pending)
                    for part in parts:
                        if part.strip():
                            show(part.decode("utf-8", "replace"))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone when the demo was interrupted
                loop.call_soon_threadsafe(done)

    # A daemon thread: an interrupted demo's loop must not wait for it (the build is stopped after).
    threading.Thread(target=pump, name="demo-build-output", daemon=True).start()
    await finished
    deadline = time.monotonic() + 60  # its output is closed: it is exiting
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if proc.returncode is None:
        raise TandemError(f"the build closed its output but did not exit within 60 s (log: {log_path})")
    return proc.returncode


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
            except (TimeoutError, aiohttp.ClientError, OSError):
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
            _say(textwrap.fill(phase.description, width=110, initial_indent=f"      phase {phase.name:<16} ",
                               subsequent_indent=" " * 29, break_long_words=False, break_on_hyphens=False))
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


@dataclass
class _BundleFacts:
    """What the phase descriptions quote from the bundle's manifest."""

    target: float  # the accuracy the cascade phases ask for
    threshold: float  # the confidence threshold calibration gives for it
    keep_share: float  # the share of calibration inputs kept on the edge at that threshold
    confidence: str  # how the edge scores its answers (max_softmax, margin, head)
    calibration: str  # "359 validation inputs"
    edge_accuracy: float | None
    cloud_accuracy: float | None
    n_eval: int | None


def _bundle_facts(repo: Path) -> _BundleFacts:
    """The cascade's target (the best accuracy its calibration reached) and what it means."""
    from tandem.shared.bundle import read_manifest, version_key

    versions = sorted((p.parent.name for p in (repo / MODEL).glob("*/manifest.json")), key=version_key)
    _, m = read_manifest(repo / MODEL / versions[-1])

    def quality(role: str) -> tuple[float | None, int | None]:
        v = next((v for v in m.variants if v.role == role and v.metrics is not None), None)
        if v is None or v.metrics is None:
            return None, None
        q = v.metrics.quality if v.metrics.quality is not None else v.metrics.accuracy
        return q, v.metrics.n_eval

    (edge_acc, n_eval), (cloud_acc, _) = quality("edge"), quality("cloud")
    cal = m.calibration
    if cal is None or not cal.points:
        return _BundleFacts(0.9, float("nan"), float("nan"), "max_softmax", "no calibration", edge_acc, cloud_acc, n_eval)
    target = max(p.cascade_accuracy for p in cal.points)
    point = cal.threshold_for(target - 1e-12)  # the same choice the router makes for this target
    assert point is not None
    return _BundleFacts(target, point.threshold, point.keep_share, cal.confidence, f"{cal.n} {cal.split} inputs",
                        edge_acc, cloud_acc, n_eval)


def _money(v: float) -> str:
    return f"${v:.3f}" if v >= 0.01 or v == 0 else f"${v:g}"


def _phases(f: _BundleFacts, slo: float, outage_s: float) -> list[Phase]:
    """The workload's phases, each described by what its policy really does with this bundle."""

    def acc(v: float | None) -> str:
        return "unknown" if v is None else f"{v:.3f}"

    if f.threshold != f.threshold:  # NaN: not calibrated
        cascade = f"edge first; unsure answers go to the cloud (target accuracy {f.target:.3f}; the bundle has no calibration)"
    elif f.keep_share >= 0.999:
        cascade = (f"edge first: an answer goes to the cloud when the edge's confidence ({f.confidence.replace('_', ' ')}) is "
                   f"below a calibrated threshold. On the bundle's {f.calibration} the edge alone was the most accurate "
                   f"choice ({f.target:.3f}; sending its least sure answers to the cloud did not improve on it), so the "
                   f"threshold is {f.threshold:.3f} and every answer stays on the edge.")
    else:
        cascade = (f"edge first: the edge's answer is kept when its confidence ({f.confidence.replace('_', ' ')}) is at "
                   f"least {f.threshold:.3f}, else the call goes to the cloud. That threshold is calibrated for an accuracy "
                   f"of {f.target:.3f} for the whole cascade: on the bundle's {f.calibration} it kept {f.keep_share:.0%} of "
                   f"the answers on the edge and reached {f.target:.3f} (the best any threshold did). The test inputs here "
                   "are other inputs, so the accuracy below comes close to it, not to the digit.")
    better = "cloud" if (f.cloud_accuracy or 0) > (f.edge_accuracy or 0) else "edge"
    constrained = (f"the tier with the best expected accuracy that fits the call's budget ({slo:g} ms deadline, at most "
                   f"{_money(PRICE)} per call). The bundle's evaluation on {f.n_eval or '?'} test inputs rates the cloud "
                   f"{acc(f.cloud_accuracy)} and the edge {acc(f.edge_accuracy)}, so calls go to the {better}"
                   + (" while its p95 latency fits the deadline and its price fits the budget, else to the edge."
                      if better == "cloud" else "."))
    return [
        Phase("edge-only", {"policy": "edge-only"}, f"every call answered on the device (edge model, accuracy "
              f"{acc(f.edge_accuracy)} in the bundle's evaluation)"),
        Phase("cloud-only", {"policy": "cloud-only", "latency_ms": 2000}, f"every call answered by the cloud (its model's "
              f"accuracy: {acc(f.cloud_accuracy)}); the edge answers only if the cloud fails"),
        Phase("cascade", {"policy": "cascade", "target_accuracy": f.target}, cascade),
        Phase("constrained", {"policy": "constrained", "latency_ms": slo, "max_cost": PRICE}, constrained),
        Phase("cascade+outage", {"policy": "cascade", "target_accuracy": f.target, "latency_ms": slo},
              f"the cascade with a deadline of {slo:g} ms per call; the link to the cloud is cut (a network partition) for "
              f"{outage_s:g} s in the middle: answers the cascade would send to the cloud are given by the edge instead",
              outage=True),
    ]


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) if v else float("nan")


#: Fallback reasons (edge/router.py, edge/client.py) in words, without the numbers that differ per call.
_WHY = [
    (re.compile(r"ms left < .* needed"), "too little of the deadline left for a cloud call"),
    (re.compile(r"^cloud deadline_exceeded\b"), "the cloud call timed out"),
    (re.compile(r"^cloud (\w+):"), "the cloud call failed ({0})"),
    (re.compile(r"^circuit open"), "circuit breaker open (the cloud had failed repeatedly)"),
    (re.compile(r"^cloud asked to retry"), "the cloud asked to retry later"),
    (re.compile(r"^cloud cost .* > max_cost"), "the cloud's price is above max_cost"),
    (re.compile(r"^cloud late"), "the cloud was late, the edge answered first"),
]


def _why(reason: str) -> str:
    for pattern, words in _WHY:
        m = pattern.search(reason)
        if m:
            return words.format(*m.groups())
    return reason[:80]


def _phase_stats(p: Phase) -> dict[str, float]:
    ok = [c for c in p.calls if c.status == 200]
    lat = [c.latency_ms for c in p.calls]
    return {"calls": len(p.calls), "ok": len(ok),
            "accuracy": float(np.mean([c.correct for c in ok])) if ok else float("nan"),
            "cloud": float(np.mean([c.tier == "cloud" for c in ok])) if ok else float("nan"),
            "cost": sum(c.cost for c in ok), "p50": _pct(lat, 50), "p99": _pct(lat, 99)}


def _report(phases: list[Phase], outage: dict[str, Any], delivered: tuple[int, int], out_png: Path,
            cloud_latency_ms: float) -> str:
    rows = [f"{'phase':<24}{'calls':>6}{'accuracy':>10}{'cloud':>8}{'cost $':>9}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"]
    for p in phases:
        st = _phase_stats(p)
        rows.append(f"{p.name:<24}{st['calls']:>6}{st['accuracy']:>10.3f}{st['cloud']:>8.1%}{st['cost']:>9.3f}"
                    f"{st['p50']:>9.1f}{st['p99']:>9.1f}{st['calls'] - st['ok']:>8}")
    lines = ["", "\n".join(rows), "",
             textwrap.fill(f"accuracy: share of answers that were right (the digits' true labels); cloud: share of calls "
                           f"the cloud answered; cost $: what the phase's cloud calls cost at {_money(PRICE)} each; "
                           f"p50/p99 ms: latency as the app sees it through the agent, the cloud link adding "
                           f"{cloud_latency_ms:g} ms; failed: calls without an answer.", width=110), ""]
    during = [c for p in phases for c in p.calls if c.outage]
    if during:
        tiers = {t: sum(c.tier == t for c in during) for t in ("edge", "cloud", "failed")}
        fell_back = [c for c in during if c.fallbacks]
        why: dict[str, int] = {}
        for c in fell_back:
            for f in dict.fromkeys(_why(f) for f in c.fallbacks):  # each reason once per call
                why[f] = why.get(f, 0) + 1
        top = "; ".join(f"{k}: {v} calls" for k, v in sorted(why.items(), key=lambda kv: -kv[1])[:3]) or "-"
        lines.append(f"outage: the cloud was partitioned for {outage['end'] - outage['start']:.1f} s while {len(during)} calls "
                     f"came in: {tiers['edge']} answered on the edge, {tiers['cloud']} by the cloud, {tiers['failed']} failed "
                     f"(p99 {_pct([c.latency_ms for c in during], 99):.0f} ms).")
        if fell_back:
            lines.append(f"        {len(fell_back)} of them the cascade tried to send to the cloud; the edge answered them "
                         f"within their deadline instead (why: {top}). Those calls keep the edge's less sure answer, so "
                         "expect this phase's accuracy to be below the cascade's.")
        else:
            lines.append("        None of them was unsure enough for the cascade to try the cloud.")
        lines.append(f"        The agent's outbox held up to {outage.get('max_outbox_depth', 0)} records (routes, telemetry, "
                     f"feedback) meanwhile; {delivered[0]}/{delivered[1]} feedback records of this run reached the cloud after it came back.")
    lines.append(f"plot: {out_png}")
    _plot(phases, outage, out_png)
    return "\n".join(lines)


_TIER_STYLE = {"edge": ("tab:green", "o", "answered on the edge"), "cloud": ("tab:blue", "o", "answered by the cloud"),
               "failed": ("tab:red", "x", "failed")}


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a share (Wilson): how far a phase's accuracy may be from the model's by chance."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def _plot(phases: list[Phase], outage: dict[str, Any], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 9.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.15], hspace=0.5, wspace=0.32)
    ax_acc, ax_share, ax_lat = (fig.add_subplot(grid[0, i]) for i in range(3))
    ax_out = fig.add_subplot(grid[1, :])
    names = [p.name for p in phases]
    xs = np.arange(len(phases))
    stats = [_phase_stats(p) for p in phases]

    # Accuracy, zoomed to where the phases differ, with the 95% interval of each share.
    accs = np.array([st["accuracy"] for st in stats])
    cis = [_wilson(sum(c.correct for c in p.calls if c.status == 200), int(st["ok"])) for p, st in zip(phases, stats)]
    lo = np.array([a - c[0] for a, c in zip(accs, cis)])
    hi = np.array([c[1] - a for a, c in zip(accs, cis)])
    ax_acc.errorbar(xs, accs, yerr=[lo, hi], fmt="o", color="black", ecolor="gray", capsize=4)
    for x, a in zip(xs, accs):
        ax_acc.annotate(f"{a:.3f}", (x, a), textcoords="offset points", xytext=(8, -3), fontsize=8)
    finite = [v for c in cis for v in c if v == v]
    bottom = max(0.0, min(finite + [float(np.nanmin(accs))]) - 0.01) if finite else 0.0
    ax_acc.set_ylim(bottom, 1.0)
    ax_acc.set_xlim(-0.5, len(phases) - 0.3)
    ax_acc.set_title("accuracy per phase\n(zoomed; bars: 95% interval for this many calls)", fontsize=10)

    shares = [st["cloud"] * 100 for st in stats]
    ax_share.bar(xs, shares, 0.6, color="tab:blue")
    for x, v, st in zip(xs, shares, stats):
        ax_share.annotate(f"{v:.0f}%\n{_money(st['cost'])}", (x, v), textcoords="offset points", xytext=(0, 3),
                          ha="center", fontsize=8)
    ax_share.set_ylim(0, 130)
    ax_share.set_yticks([0, 25, 50, 75, 100])
    ax_share.set_title(f"calls answered by the cloud (%)\nand their cost at {_money(PRICE)} per call", fontsize=10)

    # Latency per phase: every call as a dot (jittered), its tier as colour; p50/p99 written above.
    rng = np.random.default_rng(0)
    for i, p in enumerate(phases):
        for tier, (color, marker, _) in _TIER_STYLE.items():
            lat = [c.latency_ms for c in p.calls if c.tier == tier]
            if lat:
                ax_lat.scatter(i + rng.uniform(-0.25, 0.25, len(lat)), lat, s=4, color=color, marker=marker, alpha=0.5,
                               linewidths=0.8)
        st = stats[i]
        ax_lat.hlines(st["p50"], i - 0.32, i + 0.32, colors="black", linewidths=1.5, linestyles="solid")
        ax_lat.hlines(st["p99"], i - 0.32, i + 0.32, colors="black", linewidths=0.8, linestyles="dashed")
    ax_lat.set_yscale("log")
    top = max([st["p99"] for st in stats if st["p99"] == st["p99"]] + [1.0])
    ax_lat.set_ylim(top=top * 12)
    for i, st in enumerate(stats):
        ax_lat.annotate(f"p50 {st['p50']:.1f}\np99 {st['p99']:.1f}", (i, top * 2), ha="center", fontsize=7)
    ax_lat.set_ylabel("ms")
    ax_lat.set_title("latency per call, by phase\n(lines: p50 solid, p99 dashed)", fontsize=10)

    for ax in (ax_acc, ax_share, ax_lat):
        ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=9)
        ax.grid(axis="y", alpha=0.3)

    # The outage phase over time: the partition shaded, each call's latency and who answered it.
    out_phase = next((p for p in phases if p.outage), None)
    if out_phase is not None and out_phase.calls and "start" in outage:
        t0 = out_phase.calls[0].t
        start, end = outage["start"] - t0, outage.get("end", outage["start"]) - t0
        ax_out.axvspan(start, end, color="tab:red", alpha=0.10, label="cloud partitioned")
        for tier, (color, marker, label) in _TIER_STYLE.items():
            pts = [(c.t - t0, c.latency_ms) for c in out_phase.calls if c.tier == tier and not c.fallbacks]
            if pts:
                ax_out.scatter([t for t, _ in pts], [ms for _, ms in pts], s=8, color=color, marker=marker, label=label, linewidths=0.8)
        pts = [(c.t - t0, c.latency_ms) for c in out_phase.calls if c.fallbacks and c.tier == "edge"]
        if pts:
            ax_out.scatter([t for t, _ in pts], [ms for _, ms in pts], s=22, facecolors="none", edgecolors="tab:orange", linewidths=1.0,
                           label="edge answered after the cloud could not")
        ax_out.set_yscale("log")
        ax_out.set_xlabel(f"seconds into the {out_phase.name} phase")
        ax_out.set_ylabel("latency (ms)")
        ax_out.set_title(f"{out_phase.name}: every call during the cloud outage and around it", fontsize=10)
        ax_out.grid(alpha=0.3)
        # Below the plots, clear of every point; the colours are the same in the latency panel above.
        handles, labels = ax_out.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, markerscale=1.5, frameon=False)
    else:
        ax_out.set_axis_off()
    fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.12)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


async def _demo(work: Path, quick: bool, rebuild: bool, cloud_latency_ms: float, procs: _Processes) -> int:
    from tandem.edge.faultproxy import FaultProxy

    checkout = _checkout()
    repo, pub = await _ensure_bundle(work, checkout, quick, rebuild, procs)

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
               "router": {"cloud_cost_per_call": PRICE}}
        (work / "agent.json").write_text(json.dumps(cfg, indent=2))
        agent_url = f"http://127.0.0.1:{cfg['port']}"
        _say(f"[3/5] edge agent: `tandem agent run --config {work / 'agent.json'}` on {agent_url}")
        _say(f"      it reaches the cloud through a fault proxy adding {cloud_latency_ms:g} ms (log: {procs.logs / 'agent.log'})")
        agent = procs.start("agent", _tandem("agent", "run", "--config", str(work / "agent.json")))
        await _wait_http(f"{agent_url}/v2/health/ready", agent, "agent", procs, timeout=120)

        x, y = _load_test_split(checkout)
        n = 60 if quick else len(x)
        x, y = x[:n], y[:n]
        slo = max(4 * cloud_latency_ms, 50.0)
        outage_s = 2.0 if quick else 5.0
        facts = _bundle_facts(repo)
        phases = _phases(facts, slo, outage_s)
        baseline = await _count_cloud_feedback(cloud_url)  # the cloud's store outlives a demo run
        _say_wrapped(f"[4/5] workload: the same {n} digits test inputs in each phase, one call at a time, through the agent's "
             f"local API. Price: {_money(PRICE)} per cloud call (the demo's example price, `router.cloud_cost_per_call` "
             "in agent.json), nothing on the edge.")
        outage = await _workload(agent_url, proxy, phases, x, y, outage_s=outage_s)

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
        report = _report(phases, outage, (got, expected), work / "demo-report.png", cloud_latency_ms)
        _say(report)
        status = await asyncio.to_thread(subprocess.run, _tandem("agent", "status", "--data", str(agent_dir)),
                                         capture_output=True, text=True, timeout=60)
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
