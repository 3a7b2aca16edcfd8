"""What drift monitoring costs on the serve hot path, and how well it detects drift.

**Overhead** (``--overhead``, the default): two ``tandem serve`` processes of the same repository
run side by side, one with monitoring on (the default) and one with ``TANDEM_MONITORING__ENABLED=false``;
``wrk`` (one thread, 64 connections, native msgpack, as ``bench/serve.py``) loads them in turn,
off/on alternating for ``--repeat`` rounds so that whatever else the machine does hits both alike
(``--together``: both at once each round, one wrk each, for a machine whose other load changes
faster than a round).
Prints req/s and p99 of every run, the median on/off ratio, what the monitor did (batches seen and
skipped, its measured share of a core, rows in its window) and the memory it holds per model
(its count arrays) beside each server's RSS. The model is the fp32 digits CNN (the teacher of
``tandem build examples/digits`` served as the cloud variant), whose bundle must carry a reference
profile (built by this Tandem).

**Detection** (``--drift-runs N``): the digits test split streamed through a cloud monitor with the
server's defaults (window 1000 rows, threshold 0.25), exactly as ``tests/test_monitor_drift.py``
does for one seed: N seeds of 1000 clean requests followed by 1000 more clean ones (false alarms:
any score at or above the threshold once the window holds ``min_rows``), and N seeds of each shift
(brightness, noise, a class removed), reporting how many requests after the shift began each was
detected.

    python bench/monitor.py --repository artifacts/repository [--duration 8] [--repeat 3]
    python bench/monitor.py --drift-runs 20 --no-overhead
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _bench_serve():  # type: ignore[no-untyped-def]
    """bench/serve.py (servers, wrk, loads), loaded by path: bench/ on sys.path would shadow the
    standard library with its own module names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tandem_bench_serve", ROOT / "bench" / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sb = _bench_serve()

CONNECTIONS = 64


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _measure(server, load, seconds: float, tmp: Path):  # type: ignore[no-untyped-def]
    """One wrk run against ``server`` with the server's CPU time per request."""
    tmp.mkdir(parents=True, exist_ok=True)
    before = sb.process_cpu(server.proc.pid)
    r = sb.wrk(server.base, load, CONNECTIONS, seconds, tmp)
    after = sb.process_cpu(server.proc.pid)
    if before and after:
        r.server_cpu_us = (after[0] - before[0]) / max(1, r.rps * seconds) * 1e6
    return r


def _together(servers: dict, load, seconds: float, tmp: Path) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """Both servers loaded at the same time (one wrk each): whatever else the machine runs in
    that moment slows both alike, and they share the cores evenly."""
    import threading

    got: dict = {}  # type: ignore[type-arg]

    def run(label: str) -> None:
        got[label] = _measure(servers[label], load, seconds, tmp / label)

    threads = [threading.Thread(target=run, args=(label,)) for label in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def overhead(args: argparse.Namespace, tmp: Path) -> None:
    from support import make_keys

    repo = Path(args.repository)
    if not (repo / "digits").is_dir():
        raise SystemExit(f"no {repo}/digits: run `tandem build examples/digits --repository {repo}` first")
    private, public = make_keys(tmp / "keys")
    fp32_repo = sb._fp32_teacher_repo(repo, tmp, private)
    from tandem.shared.bundle import load_bundle

    manifest = load_bundle(fp32_repo / "digits-fp32" / "1", public).manifest
    if manifest.profile is None:
        raise SystemExit("the digits bundle has no reference profile: rebuild it with this Tandem")
    case = sb._case(fp32_repo, "digits-fp32", "digits-fp32")
    load = sb.native_load(case)
    print(f"== {case.describe}; {CONNECTIONS} connections, {args.duration:g} s per run, {args.repeat} rounds off/on", flush=True)
    servers = {}
    started: dict[str, float] = {}
    try:
        for label, enabled in (("off", "false"), ("on", "true")):
            port = sb._free_port()
            servers[label] = sb.Server(
                f"tandem monitoring {label}", ["tandem", "serve", "--repository", str(fp32_repo), "--port", str(port),
                                               "--trusted-key", str(public), *args.serve_args],
                port, "/v2/health/ready", tmp / f"serve-{label}.log",
                {"TANDEM_ACCESS_LOG": "false", "TANDEM_MONITORING__ENABLED": enabled},
            )
            started[label] = time.perf_counter()
            sb.check_answer("native", servers[label], load, case)
        for label in ("off", "on"):  # warm-up, discarded
            sb.wrk(servers[label].base, load, CONNECTIONS, min(2.0, args.duration), tmp)
        runs: dict[str, list[sb.Run]] = {"off": [], "on": []}
        for i in range(args.repeat):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            if args.together:
                got = _together(servers, load, args.duration, tmp)
            else:
                got = {label: _measure(servers[label], load, args.duration, tmp / label) for label in order}
            for label in order:
                r = got[label]
                runs[label].append(r)
                print(f"  round {i + 1} {label:>3}: {r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
                      f"  server CPU {r.server_cpu_us or 0:6.1f} us/req  errors {r.errors}", flush=True)
        med = {k: statistics.median(r.rps for r in v) for k, v in runs.items()}
        pairs = [on.rps / off.rps for on, off in zip(runs["on"], runs["off"])]
        print(f"\nmedian req/s: off {med['off']:.0f}, on {med['on']:.0f}; on/off = {med['on'] / med['off']:.3f}; "
              f"median of the rounds' on/off ratios {statistics.median(pairs):.3f} (per round: {', '.join(f'{p:.3f}' for p in pairs)})")
        cpu = {k: statistics.median(r.server_cpu_us or 0 for r in v) for k, v in runs.items()}
        cpu_pairs = [on.server_cpu_us / off.server_cpu_us for on, off in zip(runs["on"], runs["off"])
                     if on.server_cpu_us and off.server_cpu_us]
        if cpu_pairs:
            # CPU per request falls as throughput rises (fuller batches): compare within a round.
            print(f"server CPU per request: median off {cpu['off']:.1f} us, on {cpu['on']:.1f} us; median of the rounds' "
                  f"on/off ratios {statistics.median(cpu_pairs):.3f} (per round: {', '.join(f'{p:.3f}' for p in cpu_pairs)})")
        p99 = {k: statistics.median(r.p99_ms for r in v) for k, v in runs.items()}
        print(f"median p99: off {p99['off']:.2f} ms, on {p99['on']:.2f} ms")
        status, _, body = sb._http(servers["on"].base + "/v1/monitor/digits-fp32")
        if status != 200:
            raise RuntimeError(f"monitor endpoint answered {status}: {body[:300]!r}")
        doc = json.loads(body)
        o = doc["overhead"]
        print(f"monitor (on): {o['batches']} batches seen, {o['skipped']} skipped by the CPU budget, "
              f"{o['cpu_share'] * 100:.2f}% of a core in the instance thread + {o['loop_cpu_share'] * 100:.2f}% on the loop "
              f"(intervals), {doc['input_quality']['rows']} rows profiled (at most {o['rows_per_batch']} per batch), "
              f"window {doc['window_rows']} rows")
        on_cpu = [r.server_cpu_us * r.rps * args.duration / 1e6 for r in runs["on"] if r.server_cpu_us]
        if on_cpu:
            # Every CPU second monitoring took since the server started (idle rounds included),
            # against the CPU seconds the on-server used while it was being loaded.
            alive = time.perf_counter() - started["on"]
            monitor_s, loop_s = o["cpu_share"] * alive, o["loop_cpu_share"] * alive
            print(f"CPU: monitoring took {monitor_s:.2f} s (instance thread) + {loop_s:.2f} s (loop) = "
                  f"{(monitor_s + loop_s) / sum(on_cpu) * 100:.2f}% of the {sum(on_cpu):.1f} CPU-seconds the on-server used "
                  f"under load ({sum(on_cpu) / (args.duration * len(on_cpu)):.2f} cores)")
        print(f"memory: running profile {o['profile_bytes'] / 1024:.0f} KiB per model "
              f"({len(manifest.profile.features_for('cloud'))} features); RSS off "
              f"{_rss_mb(servers['off'].proc.pid) or 0:.0f} MB, on {_rss_mb(servers['on'].proc.pid) or 0:.0f} MB")
    finally:
        for s in servers.values():
            s.stop()


def detection(runs: int) -> None:
    import tempfile as tf

    from support import make_keys
    from tandem.shared.bundle import load_bundle
    from test_monitor_drift import DETECT_WITHIN, _run
    from test_monitor_support import SHIFTS, make_digits_bundle

    d = Path(tf.mkdtemp(prefix="tandem-drift-"))
    try:
        private, public = make_keys(d / "keys")
        bundle = load_bundle(make_digits_bundle(d / "digits" / "1", private), public)
        print(f"\n== detection over {runs} seeds (window 1000 rows, min_rows 500, threshold 0.25; one row per request)")
        t0 = time.perf_counter()
        maxes, alarms = [], 0
        for seed in range(100, 100 + runs):
            clean_max, detected, monitor = _run(bundle, None, seed, shifted_rows=1000)
            # _run's "shifted" part is clean here: any crossing in either part is a false alarm.
            final = monitor.report.score if monitor.report else 0.0
            worst = max(clean_max, final or 0.0)
            maxes.append(worst)
            alarms += detected is not None or worst >= monitor.config.threshold
        print(f"unshifted: {alarms}/{runs} runs crossed the threshold (false-alarm rate {alarms / runs:.0%}); "
              f"highest score per run: median {np.median(maxes):.3f}, max {max(maxes):.3f}")
        for shift in SHIFTS:
            found = [_run(bundle, shift, seed)[1] for seed in range(100, 100 + runs)]
            hit = [f for f in found if f is not None]
            print(f"{shift:<14} detected in {len(hit)}/{runs} runs after {min(hit, default=0)}-{max(hit, default=0)} "
                  f"requests (median {np.median(hit) if hit else float('nan'):.0f}; the test requires <= {DETECT_WITHIN[shift]})")
        print(f"({time.perf_counter() - t0:.0f} s)")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", default="artifacts/repository")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-overhead", action="store_true", help="skip the serve overhead measurement")
    ap.add_argument("--together", action="store_true",
                    help="load both servers at the same time each round (on a busy machine) instead of one after the other")
    ap.add_argument("--drift-runs", type=int, default=0, help="seeds of the detection measurement (0: skip)")
    ap.add_argument("--serve-args", nargs="*", default=[], help="extra arguments for both tandem serve processes")
    args = ap.parse_args()
    if not args.no_overhead:
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is not installed: `sudo apt-get install -y wrk`")
        with tempfile.TemporaryDirectory(prefix="tandem-monitor-bench-") as tmp:
            overhead(args, Path(tmp))
    if args.drift_runs:
        detection(args.drift_runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
