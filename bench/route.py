"""Routing benchmark: every policy over the digits test split, cloud behind a FaultProxy.

    python bench/route.py --repository /tmp/repo                # digits bundle built by `tandem build`
    python bench/route.py --toy                                  # toy bundle from tests/support (no torch)

Starts the cloud (`tandem serve` if installed, else the tests' stand-in server) on 127.0.0.1, puts a
FaultProxy in front of it (default 40 ms ± 10 ms round trip), then for each policy sends the whole
test split one call at a time through the sync ``HybridClient.infer`` and prints accuracy, share sent
to the cloud, cost, p50/p99 latency, share within the latency budget and decision overhead. Also
measures a HybridClient edge call against a raw ``session.run`` (interleaved, medians) and writes a
PNG of the cascade's accuracy-vs-cloud-share curve.
"""

from __future__ import annotations

import argparse
import faulthandler
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from edge_support import CloudProcess, free_port  # noqa: E402
from tandem.edge import Budget, HybridClient  # noqa: E402
from tandem.shared.bundle import load_bundle, version_key  # noqa: E402
from tandem.shared.errors import DeadlineExceeded  # noqa: E402


def _latest(repo: Path, model: str) -> Path:
    versions = [p for p in (repo / model).iterdir() if (p / "manifest.json").is_file()]
    if not versions:
        raise SystemExit(f"no bundle of {model} in {repo}: run `tandem build examples/digits --repository {repo}`")
    return max(versions, key=lambda p: version_key(p.name))


def _toy(workdir: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    from support import make_bundle, make_keys, run_onnx

    priv, pub = make_keys(workdir / "keys")
    b = make_bundle(workdir / "repo" / "toy" / "1", priv)
    x = np.random.default_rng(123).standard_normal((360, 64)).astype(np.float32)
    y = run_onnx(b / "cloud-fp32.onnx", x).argmax(1)
    return workdir / "repo", pub, x, y


# The FaultProxy with latency bursts: every EVERY s, for LENGTH s, the round trip becomes LATENCY ms.
_BURSTY_PROXY = """
import asyncio, sys
from tandem.edge.faultproxy import FaultProxy
async def main(upstream, port, latency, jitter, every, length, burst_latency):
    p = FaultProxy(("127.0.0.1", int(port)), ("127.0.0.1", int(upstream)))
    p.set(latency_ms=latency, jitter_ms=jitter)
    await p.start()
    while True:
        await asyncio.sleep(every - length)
        p.set(latency_ms=burst_latency)
        await asyncio.sleep(length)
        p.set(latency_ms=latency)
asyncio.run(main(*map(float, sys.argv[1:])))
"""


class ProxyProcess:
    """The FaultProxy in its own process (its CLI), so it never competes with the client for the GIL.
    ``bursts`` = (every s, length s, latency ms): periodic windows in which the cloud is late."""

    def __init__(self, upstream_port: int, latency_ms: float, jitter_ms: float, bursts: tuple[float, float, float] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if bursts is None:
            cmd = [sys.executable, "-m", "tandem.edge.faultproxy", "--upstream", f"127.0.0.1:{upstream_port}",
                   "--listen", f"127.0.0.1:{self.port}", "--latency", str(latency_ms), "--jitter", str(jitter_ms)]
        else:
            cmd = [sys.executable, "-c", _BURSTY_PROXY, *map(str, (upstream_port, self.port, latency_ms, jitter_ms, *bursts))]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("fault proxy did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def run_policy(client: HybridClient, x: np.ndarray, y: np.ndarray, budget: Budget) -> dict[str, Any]:
    lat, tiers, correct, cost = [], [], [], 0.0
    late: list[str] = []
    why: Counter[str] = Counter()
    for i in range(len(x)):
        xi = x[i : i + 1]
        t0 = time.perf_counter()
        try:
            r = client.infer(xi, budget)
        except DeadlineExceeded:
            faulthandler.dump_traceback(all_threads=True)  # where a stalled client loop is stuck
            raise
        lat.append((time.perf_counter() - t0) * 1000)
        if budget.latency_ms and lat[-1] > budget.latency_ms:
            late.append(f"{lat[-1]:.1f} ms: {r.route.reason}")
        tiers.append(r.route.tier == "cloud")
        correct.append(int(r.outputs["logits"].argmax()) == int(y[i]))
        cost += r.route.cost
        why[re.sub(r"\d+(\.\d+)?", "#", r.route.reason)] += 1
    lat_a = np.array(lat)
    return {
        "acc": float(np.mean(correct)),
        "cloud": float(np.mean(tiers)),
        "cost": cost,
        "p50": float(np.percentile(lat_a, 50)),
        "p99": float(np.percentile(lat_a, 99)),
        "max": float(lat_a.max()),
        "within": float(np.mean(lat_a <= budget.latency_ms)) if budget.latency_ms else 1.0,
        "why": why.most_common(3),
        "late": late,
    }


def decision_us(client: HybridClient, budget: Budget, n: int = 20000) -> float:
    d = client.router.decide
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            d(budget)
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def edge_overhead(client: HybridClient, x: np.ndarray, n: int = 5000, rounds: int = 9) -> tuple[float, float, float, float]:
    """Median µs of a raw ``session.run(None, {name: x})`` (what a user writes), the same with the
    output names passed, and ``HybridClient.infer`` (edge-only), in interleaved rounds on the same
    input: (raw None, raw names, hybrid, hybrid / raw None)."""
    sess, names = client.runtime.session, client.runtime.output_names
    name = client.runtime.input_names[0]
    xi = x[:1]
    budget = Budget(policy="edge-only")
    raw, raw_names, hyb = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            sess.run(None, {name: xi})
        raw.append((time.perf_counter() - t0) / n * 1e6)
        t0 = time.perf_counter()
        for _ in range(n):
            client.infer(xi, budget)
        hyb.append((time.perf_counter() - t0) / n * 1e6)
        t0 = time.perf_counter()
        for _ in range(n):
            sess.run(names, {name: xi})
        raw_names.append((time.perf_counter() - t0) / n * 1e6)
    r, rn, h = statistics.median(raw), statistics.median(raw_names), statistics.median(hyb)
    return r, rn, h, h / r


def edge_via_loop_us(client: HybridClient, x: np.ndarray, n: int = 2000) -> float:
    """Median µs of the same edge-only call made through a background event loop (the design the
    sync API avoids for edge work: it runs edge calls inline instead)."""
    import asyncio

    loop = client._background_loop()
    budget = Budget(policy="edge-only")
    xi = x[:1]
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            asyncio.run_coroutine_threadsafe(client.ainfer(xi, budget), loop).result()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def cascade_curve(client: HybridClient, x: np.ndarray, y: np.ndarray, cloud_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy and cloud share of the cascade at every threshold, from the edge's outputs and the
    cloud's predictions measured on the same split; plus the edge's confidences and predictions."""
    rt = client.runtime
    confs, edge_pred = [], []
    for i in range(len(x)):
        outs = rt.run({rt.input_names[0]: x[i : i + 1]})
        confs.append(rt.confidence(outs))
        edge_pred.append(int(outs[0].argmax()))
    confs_a, edge_a = np.array(confs), np.array(edge_pred)
    ts = np.unique(np.concatenate([[0.0], np.quantile(confs_a, np.linspace(0, 1, 101)), [1.01]]))
    acc, share = [], []
    for t in ts:
        keep = confs_a >= t
        pred = np.where(keep, edge_a, cloud_pred)
        acc.append(float((pred == y).mean()))
        share.append(float((~keep).mean()))
    return ts, np.array(acc), np.array(share), confs_a, edge_a


def offline_cascade(t: float, confs: np.ndarray, edge_pred: np.ndarray, cloud_pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, cloud share) of the cascade at threshold ``t`` on this split, network aside."""
    keep = confs >= t
    return float((np.where(keep, edge_pred, cloud_pred) == y).mean()), float((~keep).mean())


def _cloud_predictions(bundle: Any, x: np.ndarray) -> np.ndarray:
    """The cloud variant's answers computed locally: the curve is an offline analysis and must not
    depend on which calls the network let through."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.variant_path("cloud")), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, help="model repository holding the digits bundle")
    ap.add_argument("--trusted-key", type=Path, help="public key (default: REPO/../keys/tandem.pub)")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--toy", action="store_true", help="use the toy test bundle instead of digits")
    ap.add_argument("--latency", type=float, default=40.0, help="cloud round trip added by the proxy, ms")
    ap.add_argument("--jitter", type=float, default=10.0)
    ap.add_argument("--budget-ms", type=float, default=100.0, help="latency budget per call")
    ap.add_argument("--cost", type=float, default=0.0001, help="price of one cloud call")
    ap.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--png", type=Path, default=Path("bench/route_cascade.png"))
    ap.add_argument("--limit", type=int, default=None, help="use only the first N test samples")
    ap.add_argument("--bursts", default=None, metavar="EVERY:LENGTH:LATENCY",
                    help="latency bursts, e.g. 2:0.5:150 = every 2 s, for 0.5 s, the cloud round trip is 150 ms")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tandem-route-"))
    if args.toy:
        repo, pub, x, y = _toy(work)
        model = "toy"
    else:
        if args.repository is None:
            raise SystemExit("--repository is required (or --toy)")
        sys.path.insert(0, str(ROOT / "examples" / "digits"))
        from spec import load_data  # type: ignore[import-not-found]

        repo, model = args.repository, args.model
        pub = args.trusted_key or (repo.parent / "keys" / "tandem.pub")
    bundle_dir = _latest(repo, model)
    bundle = load_bundle(bundle_dir, [pub])
    if not args.toy:
        # The test split of the seed the bundle was built with (another seed's "test" was training data).
        x, y = load_data(int(bundle.manifest.provenance.build_config.get("seed", 0)))["test"]
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    with HybridClient(bundle, policy="edge-only") as c:
        raw_us, raw_names_us, hyb_us, ratio = edge_overhead(c, x)
        loop_us = edge_via_loop_us(c, x)
        outs = c.runtime.run({c.runtime.input_names[0]: x[:1]})
        t0 = time.perf_counter()
        for _ in range(20000):
            c.runtime.confidence(outs)
        conf_us = (time.perf_counter() - t0) / 20000 * 1e6
    cloud = CloudProcess(repo, pub).start()
    bursts = tuple(float(v) for v in args.bursts.split(":")) if args.bursts else None
    if bursts is not None and (len(bursts) != 3 or not 0 < bursts[1] < bursts[0]):
        raise SystemExit("--bursts wants EVERY:LENGTH:LATENCY with 0 < LENGTH < EVERY")
    proxy = ProxyProcess(cloud.port, args.latency, args.jitter, bursts)  # type: ignore[arg-type]
    burst_note = f", bursts of {bursts[2]:g} ms for {bursts[1]:g} s every {bursts[0]:g} s" if bursts else ""
    print(f"bundle {bundle.name}:{bundle.version}; cloud: tandem serve "
          f"behind FaultProxy +{args.latency:g}±{args.jitter:g} ms{burst_note}; {len(x)} test samples; budget {args.budget_ms:g} ms; "
          f"cost {args.cost:g}/cloud call")
    em = bundle.variant("edge").metrics
    cm = bundle.variant("cloud").metrics
    print(f"manifest accuracy: edge {em.accuracy if em else None}, cloud {cm.accuracy if cm else None}")
    base = {"cloud_cost_per_call": args.cost}
    budget = Budget(latency_ms=args.budget_ms)
    rows: list[tuple[str, dict[str, float], float]] = []
    cloud_pred = _cloud_predictions(bundle, x)
    try:
        configs: list[tuple[str, str, dict[str, object]]] = [
            ("always-edge", "edge-only", {}),
            ("always-cloud", "cloud-only", {}),
            ("constrained", "constrained", {}),
            ("cascade (calibrated)", "cascade", {}),
        ]
        configs += [(f"cascade t={t}", "cascade", {"cascade_threshold": float(t)}) for t in args.thresholds.split(",")]
        configs += [("hedged", "hedged", {})]
        for label, policy, extra in configs:
            with HybridClient(bundle, proxy.url, policy=policy, config={**base, **extra}) as c:
                for i in range(50):  # learn the cloud's latency before measuring
                    c.infer(x[i % len(x) : i % len(x) + 1], Budget(latency_ms=2000, policy="cloud-only"))
                stats = run_policy(c, x, y, budget)
                rows.append((label, stats, decision_us(c, budget)))
        with HybridClient(bundle, policy="edge-only") as c:
            ts, accs, shares, confs, edge_pred = cascade_curve(c, x, y, cloud_pred)
            threshold, threshold_why = c.estimates.cascade_choice(None, 0.8)
            cal = c.estimates.calibration
            old_point = cal.threshold_for(max(p.cascade_accuracy for p in cal.points) - 1e-12) if cal else None
    finally:
        proxy.stop()
        cloud.stop()

    print()
    print("why (most common Route reasons, numbers as #):")
    for label, s, _ in rows:
        print(f"  {label:<20} " + "; ".join(f"{n}× {w}" for w, n in s["why"]))
    for label, s, _ in rows:
        for line in s["late"][:3]:
            print(f"  over budget, {label}: {line}")
    print()
    print(f"{'policy':<22}{'accuracy':>9}{'cloud%':>8}{'cost':>10}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'in budget':>10}{'decide µs':>10}")
    for label, s, dus in rows:
        print(f"{label:<22}{s['acc']*100:>8.2f}%{s['cloud']*100:>7.1f}%{s['cost']:>10.4f}{s['p50']:>8.2f}{s['p99']:>8.2f}{s['max']:>8.2f}"
              f"{s['within']*100:>9.2f}%{dus:>10.2f}")
    cloud_acc = float((cloud_pred == y).mean())  # the cloud variant's own accuracy, network aside
    ok = [(sh, a) for sh, a in zip(shares, accs) if a >= cloud_acc - 0.003]
    best = min(ok) if ok else None
    print()
    print(f"calibrated cascade threshold: {threshold:.3f} ({threshold_why})")
    print(f"cloud variant accuracy on this split (offline): {cloud_acc*100:.2f}%")
    acc_t, share_t = offline_cascade(threshold, confs, edge_pred, cloud_pred, y)
    print(f"default threshold on this split (offline): accuracy {acc_t*100:.2f}% ({(acc_t - cloud_acc)*100:+.2f} pt vs cloud-only), "
          f"{share_t*100:.1f}% to the cloud")
    if old_point is not None:
        acc_o, share_o = offline_cascade(old_point.threshold, confs, edge_pred, cloud_pred, y)
        print(f"  (the previous rule, max validation cascade accuracy, would pick {old_point.threshold:.3f}: "
              f"accuracy {acc_o*100:.2f}% ({(acc_o - cloud_acc)*100:+.2f} pt), {share_o*100:.1f}% to the cloud)")
    if best:
        print(f"cascade curve: cloud-only accuracy − 0.3 pt reached with {best[0]*100:.1f}% of calls to the cloud (accuracy {best[1]*100:.2f}%)")
    print(f"edge call: raw session.run(None, feed) {raw_us:.2f} µs, HybridClient.infer {hyb_us:.2f} µs, ratio {ratio:.3f} "
          f"(raw session.run(names, feed) {raw_names_us:.2f} µs, ratio {hyb_us / raw_names_us:.3f})")
    print(f"the same edge call through a background event loop + thread pool: {loop_us:.2f} µs (why sync edge calls run inline)")
    print(f"confidence (max softmax on one row of logits): {conf_us:.2f} µs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(shares * 100, accs * 100, "-", label="cascade (all thresholds)")
    for label, s, _ in rows:
        ax.plot(s["cloud"] * 100, s["acc"] * 100, "o")
        ax.annotate(label, (s["cloud"] * 100, s["acc"] * 100), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax.axhline(cloud_acc * 100 - 0.3, ls=":", c="grey", label="cloud-only − 0.3 pt")
    ax.set_xlabel("calls sent to the cloud (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{bundle.name}:{bundle.version} cascade, cloud +{args.latency:g}±{args.jitter:g} ms")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
