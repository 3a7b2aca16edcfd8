"""What does the Redis job queue cost per row, against running the same batches directly?

In one run, for each job size (rows per job; the batch the worker runs is ``--batch`` rows, its
max_batch_size, into which it coalesces jobs; by default one job per batch) and each number of
``tandem worker`` processes on this machine (1, 2, 4):

* **queue**: a real redis-server (AOF on, ``--appendfsync`` as given), N ``tandem worker``
  processes (each session with cores // N intra-op threads). The workers are started and warmed
  up, then paused (SIGSTOP) while ``--jobs`` native msgpack jobs are stored in the queue (the same
  MULTI/EXEC a ``tandem serve`` submit does); the clock runs from resuming them (SIGCONT) until
  every result is stored (the queue's result counter). What is measured: claiming, decoding,
  batching, computing, encoding, storing and acknowledging.
* **direct**: N processes, each an onnxruntime session of the same variant with the same thread
  settings as a worker's, running its share of the same batches with ``session.run`` (inputs
  already in memory), started together; the clock runs until the last one finishes.

Prints, for ``--repeat`` direct/queue pairs run alternately, then as medians per configuration:
the rows/s of both and their ratio (wall clock), and the CPU time per row of both (the queue's:
every worker process and redis-server, all threads, from /proc) with the queue's overhead per row
(queue CPU / direct CPU - 1). On a machine shared with other work the wall-clock ratio follows the
other work as much as the queue; the CPU time per row does not.

    python bench/jobs.py [--repository REPO --trusted-key PUB.pem | --insecure-skip-signature]
                          [--model digits] [--rows 32,64] [--workers 1,2,4] [--jobs 800]
                          [--batch 64] [--repeat 3] [--appendfsync everysec]

Without ``--repository`` the model is tests/support's MLP bundle (64-128-128-10): nearly no
compute, so the figures are then the queue's overhead against almost nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, where this module's name would
# hide the standard library's queue module from everything imported after (redis, logging).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support.py (bundles), redis_support.py (redis-server)

from redis_support import RedisServer


def _direct_child(args: argparse.Namespace) -> int:
    """One direct process: build the session, warm up, wait for 'go' on stdin, run, print seconds."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(args.direct, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(args.seed)
    batches = [rng.standard_normal((args.rows, 64)).astype(np.float32) for _ in range(min(args.batches, 64))]
    warm_until = time.perf_counter() + 1.0  # as long as a worker's warm-up and first jobs
    i = 0
    while time.perf_counter() < warm_until:
        sess.run(None, {name: batches[i % len(batches)]})
        i += 1
    print("ready", flush=True)
    sys.stdin.readline()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.batches):
        sess.run(None, {name: batches[i % len(batches)]})
    print(f"{time.perf_counter() - t0:.6f} {time.process_time() - c0:.6f}", flush=True)
    return 0


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _direct(model_file: Path, rows: int, jobs: int, workers: int, threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) N direct processes take to run ``jobs`` batches of ``rows`` rows
    between them."""
    share = [jobs // workers + (1 if i < jobs % workers else 0) for i in range(workers)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--direct", str(model_file), "--rows", str(rows), "--batches", str(n),
             "--threads", str(threads), "--seed", str(i)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for i, n in enumerate(share)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    cpu = 0.0
    for p in procs:
        assert p.stdout is not None
        cpu += float(p.stdout.readline().split()[1])
        p.wait(600)
    return time.perf_counter() - t0, cpu


async def _fill(url: str, prefix: str, model: str, rows: int, jobs: int, seed: int) -> None:
    """Store ``jobs`` native jobs as a ``tandem serve`` submit does (hash + stream entry, MULTI/EXEC)."""
    from tandem.cloud.job_queue import JobRecord, request_hash
    from tandem.cloud.redis_queue import RedisJobQueue
    from tandem.shared import protocol as p
    from tandem.shared.jobs import new_job_id

    q = RedisJobQueue(url, prefix=prefix)
    rng = np.random.default_rng(seed)
    bodies = [p.InferRequest({"input": rng.standard_normal((rows, 64)).astype(np.float32)}).to_wire() for _ in range(64)]
    try:
        for i in range(jobs):
            body = bodies[i % len(bodies)]
            job = JobRecord(
                id=new_job_id(), model=model, version=None, protocol="v1", body=body, header_length=None, rows=rows,
                priority=0, created=time.time(), body_hash=request_hash("v1", model, None, None, body),
            )
            await q.put(job, 1 << 30)
    finally:
        await q.close()


def _results(r: object, prefix: str) -> int:
    v = r.hget(f"{prefix}:stats", "results")  # type: ignore[attr-defined]
    return int(v) if v else 0


def _wait_results(r: object, prefix: str, n: int, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while _results(r, prefix) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {_results(r, prefix)} of {n} results after {timeout} s")
        time.sleep(0.002)


_RUNS: list[None] = []


def _queue(
    args: argparse.Namespace, server: RedisServer, tmp: Path, rows: int, batch: int, workers: int, threads: int,
    trust: list[str],
) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the workers, of redis-server) N workers take to run
    ``args.jobs`` jobs of ``rows`` rows from a filled queue."""
    redis_url = server.url
    import redis

    _RUNS.append(None)
    prefix = f"bench{rows}x{workers}r{len(_RUNS)}"  # fresh keys and counters per run
    config = tmp / f"{prefix}.json"
    config.write_text(json.dumps({
        "batching": {"max_batch_size": batch}, "warmup_batch_sizes": [batch], "intra_op_threads": threads,
        "jobs": {"redis_prefix": prefix, "claim_timeout_s": 600},
    }))
    procs = []
    logs = []
    for i in range(workers):
        log = tmp / f"{prefix}-{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tandem.shared.cli", "worker", "--queue", redis_url, "--repository", str(args.repository),
             *trust, "--name", f"w{i}", "--config", str(config), "--claim", str(args.claim)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115 - closed with the process
        ))
    r = redis.Redis.from_url(redis_url)
    try:
        for proc, log in zip(procs, logs):
            deadline = time.monotonic() + 300
            while "worker " not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
                time.sleep(0.05)
        warm = 4 * workers
        asyncio.run(_fill(redis_url, prefix, args.model, rows, warm, 99))
        _wait_results(r, prefix, warm)
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        asyncio.run(_fill(redis_url, prefix, args.model, rows, args.jobs, 0))
        early = _results(r, prefix) - warm
        if early:
            raise RuntimeError(f"{early} jobs ran while the workers were paused")
        pids = [proc.pid for proc in procs]
        c0 = sum(_cpu_seconds(pid) for pid in pids)
        r0 = _cpu_seconds(server.proc.pid)
        t0 = time.perf_counter()
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        _wait_results(r, prefix, warm + args.jobs)
        wall = time.perf_counter() - t0
        time.sleep(0.3)  # the last acknowledgements (idle workers use no CPU)
        return wall, sum(_cpu_seconds(pid) for pid in pids) - c0, _cpu_seconds(server.proc.pid) - r0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        r.close()


def _model_file(repository: Path, model: str) -> tuple[Path, str]:
    """The cloud variant's ONNX file of the model's latest version, and the version."""
    versions = sorted((d for d in (repository / model).iterdir() if (d / "manifest.json").exists()), key=lambda d: d.name)
    d = versions[-1]
    manifest = json.loads((d / "manifest.json").read_text())
    variant = next(v for v in manifest["variants"] if v["role"] == "cloud")
    return d / variant["file"], d.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=None)
    ap.add_argument("--trusted-key", default=None)
    ap.add_argument("--insecure-skip-signature", action="store_true")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--rows", default="32,64", help="rows per job (= the batch each job runs)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--jobs", type=int, default=800)
    ap.add_argument("--claim", type=int, default=16, help="jobs a worker claims at once")
    ap.add_argument("--batch", type=int, default=0,
                    help="the workers' max_batch_size: jobs of fewer rows are coalesced up to it (default: rows per job); "
                    "direct runs batches of the same size")
    ap.add_argument("--repeat", type=int, default=3, help="direct/queue pairs per configuration (alternated)")
    ap.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    ap.add_argument("--direct", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.direct:
        args.rows = int(args.rows)
        return _direct_child(args)

    from support import make_bundle, make_keys
    from tandem.cloud.cores import available_cores

    cores = available_cores()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-queue-") as tmpdir:
        tmp = Path(tmpdir)
        if args.repository is None:
            private, public = make_keys(tmp / "keys")
            make_bundle(tmp / "repo" / args.model / "1", private, name=args.model, version="1")
            args.repository, trust = tmp / "repo", ["--trusted-key", str(public)]
        elif args.insecure_skip_signature:
            trust = ["--insecure-skip-signature"]
        elif args.trusted_key:
            trust = ["--trusted-key", args.trusted_key]
        else:
            ap.error("with --repository, give --trusted-key PUB.pem or --insecure-skip-signature")
        model_file, version = _model_file(args.repository, args.model)
        redis = RedisServer(tmp / "redis", appendfsync=args.appendfsync).start()
        try:
            print(f"model {args.model}:{version} ({model_file.name}), {cores} cores, {args.jobs} jobs per run, "
                  f"claim {args.claim}, redis appendonly yes appendfsync {args.appendfsync}")
            print(f"{'rows/job':>8} {'batch':>5} {'workers':>7} {'threads':>7} | {'direct rows/s':>13} {'queue rows/s':>12} {'ratio':>6} | "
                  f"{'direct CPU us/row':>17} {'queue CPU us/row':>16} {'(of which redis)':>16} {'CPU overhead/row':>16}")
            summary = []
            for rows in [int(x) for x in args.rows.split(",")]:
                for n in [int(x) for x in args.workers.split(",")]:
                    threads = max(1, cores // n)
                    total = rows * args.jobs
                    batch = max(rows, args.batch)  # a worker coalesces jobs into batches of this many rows
                    walls, cpus = [], []
                    for _ in range(args.repeat):  # alternated, so both see the same machine
                        d_wall, d_cpu = _direct(model_file, batch, total // batch, n, threads)
                        q_wall, w_cpu, r_cpu = _queue(args, redis, tmp, rows, batch, n, threads, trust)
                        q_cpu = w_cpu + r_cpu
                        walls.append(d_wall / q_wall)
                        cpus.append(q_cpu / d_cpu - 1)
                        print(f"{rows:>8} {batch:>5} {n:>7} {threads:>7} | {total / d_wall:>13,.0f} {total / q_wall:>12,.0f} {d_wall / q_wall:>6.2f} | "
                              f"{d_cpu / total * 1e6:>17.1f} {q_cpu / total * 1e6:>16.1f} {r_cpu / total * 1e6:>16.1f} {q_cpu / d_cpu - 1:>16.1%}", flush=True)
                    summary.append((rows, batch, n, statistics.median(walls), statistics.median(cpus)))
            print("\nmedian over the repeats: wall-clock rows/s ratio (queue / direct), and the queue's CPU per row over direct's:")
            for rows, batch, n, wall, cpu in summary:
                print(f"  {rows} rows/job in batches of {batch}, {n} worker(s): rows/s ratio {wall:.2f}, CPU overhead per row {cpu:+.1%}")
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
