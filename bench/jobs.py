"""What do the job queues cost per row, against running the same batches directly?

**Redis** (``--queues redis``). In one run, for each job size (rows per job) and each number of
``tandem worker`` processes on this machine (1, 2, 4):

* **queue**: a real redis-server (AOF on, ``--appendfsync`` as given), N ``tandem worker``
  processes (each session with cores // N intra-op threads, claiming ``--claim`` jobs at a time, 64
  by default, and coalescing them into batches of up to ``--batch`` rows, 512 by default).
  The workers are started and warmed up, then paused (SIGSTOP) while ``--jobs`` native msgpack jobs
  are stored in the queue (the same MULTI/EXEC a ``tandem serve`` submit does); the clock runs from
  resuming them (SIGCONT) until every result is stored (the queue's result counter, read 50 times a
  second). What is measured: claiming, decoding, batching, computing, encoding, storing and
  acknowledging.
* **direct (a)**: N processes, each an onnxruntime session of the same variant with the same
  thread settings as a worker's, running its share of the jobs' batches (each job's rows as one
  batch) with ``session.run`` (inputs already in memory), started together; the clock runs until
  the last one finishes.
* **direct (b)**: the same, with batches of the size the workers actually ran (the mean of each
  result's ``X-Tandem-Batch-Size``): what coalescing alone would give.

Prints, for ``--repeat`` rounds (direct (a), queue, direct (b), alternated), then as medians per
configuration: the rows/s of direct (a) and the queue and their ratio (wall clock), and the CPU
time per row of all three (the queue's: every worker process and redis-server, all threads, from
/proc) with the queue's overhead per row (queue CPU / direct CPU - 1) against (a) and (b). On a
machine shared with other work the wall-clock ratio follows the other work as much as the queue;
the CPU time per row much less.

**Embedded** (``--queues embedded``): one ``tandem serve`` with its SQLite queue (1 instance, every
core's intra-op threads, batches of up to ``--batch`` rows, by default 64 jobs' worth: the
dispatcher claims 64 at a time); ``--jobs`` native jobs are submitted over HTTP (``Prefer:
respond-async``, 16 at a time) and the clock runs from the first submit until every job has
finished. Against one direct process with the same threads, (a) and (b) as above. The server's CPU
includes accepting the submits (HTTP, validation, one synced SQLite transaction each).

    python bench/jobs.py [--repository REPO --trusted-key PUB.pem | --insecure-skip-signature]
                          [--model digits] [--rows 32,64] [--workers 1,2,4] [--jobs 800]
                          [--claim 64] [--batch ROWS] [--repeat 3] [--appendfsync everysec]
                          [--queues redis,embedded]

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
    cpu, wall = 0.0, 0.0
    for p in procs:
        assert p.stdout is not None
        cpu += float(p.stdout.readline().split()[1])
        # Until the last result, not until the processes exit: onnxruntime's teardown is no work.
        wall = time.perf_counter() - t0
    for p in procs:
        p.wait(600)
    return wall, cpu


async def _fill(url: str, prefix: str, model: str, rows: int, jobs: int, seed: int) -> list[str]:
    """Store ``jobs`` native jobs as a ``tandem serve`` submit does (hash + stream entry, MULTI/EXEC);
    returns their ids."""
    from tandem.cloud.job_queue import JobRecord, request_hash
    from tandem.cloud.redis_queue import RedisJobQueue
    from tandem.shared import protocol as p
    from tandem.shared.jobs import new_job_id

    q = RedisJobQueue(url, prefix=prefix)
    rng = np.random.default_rng(seed)
    bodies = [p.InferRequest({"input": rng.standard_normal((rows, 64)).astype(np.float32)}).to_wire() for _ in range(64)]
    ids = []
    try:
        for i in range(jobs):
            body = bodies[i % len(bodies)]
            job = JobRecord(
                id=new_job_id(), model=model, version=None, protocol="v1", body=body, header_length=None, rows=rows,
                priority=0, created=time.time(), body_hash=request_hash("v1", model, None, None, body),
            )
            await q.put(job, 1 << 30)
            ids.append(job.id)
    finally:
        await q.close()
    return ids


def _results(r: object, prefix: str) -> int:
    v = r.hget(f"{prefix}:stats", "results")  # type: ignore[attr-defined]
    return int(v) if v else 0


def _wait_results(r: object, prefix: str, n: int, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while _results(r, prefix) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {_results(r, prefix)} of {n} results after {timeout} s")
        # Every look is redis-server CPU counted as the queue's: 50 a second cost < 1 us per row.
        time.sleep(0.02)


def _batch_rows(r: object, prefix: str, ids: list[str]) -> float:
    """The mean batch (rows) the workers ran the jobs in, per row: from each result's X-Tandem-Batch-Size."""
    pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
    for i in ids:
        pipe.hget(f"{prefix}:job:{i}", "result_headers")
    sizes = [int(json.loads(h)["X-Tandem-Batch-Size"]) for h in pipe.execute() if h]
    return statistics.fmean(sizes) if sizes else 0.0


_RUNS: list[None] = []
#: The workers' batch size by default: where the digits CNN computes about as efficiently per row
#: as at any size (a claimed group of 64 jobs of 32 rows runs as 4 batches, not one of 2,048 rows).
_WORKER_BATCH = 512


def _queue(
    args: argparse.Namespace, server: RedisServer, tmp: Path, rows: int, batch: int, workers: int, threads: int,
    trust: list[str],
) -> tuple[float, float, float, float]:
    """(wall seconds, CPU seconds of the workers, of redis-server, mean rows per batch the workers
    ran) N workers take to run ``args.jobs`` jobs of ``rows`` rows from a filled queue."""
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
        ids = asyncio.run(_fill(redis_url, prefix, args.model, rows, args.jobs, 0))
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
        w_cpu, r_cpu = sum(_cpu_seconds(pid) for pid in pids) - c0, _cpu_seconds(server.proc.pid) - r0
        return wall, w_cpu, r_cpu, _batch_rows(r, prefix, ids)
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


async def _submit_and_wait(url: str, model: str, rows: int, jobs: int, concurrency: int = 16) -> tuple[list[str], float]:
    """Submit ``jobs`` native jobs over HTTP (``Prefer: respond-async``, ``concurrency`` at a time),
    then wait until every one has finished: (job ids, wall seconds from the first submit)."""
    import aiohttp

    from tandem.shared import protocol as p

    rng = np.random.default_rng(0)
    bodies = [p.InferRequest({"input": rng.standard_normal((rows, 64)).astype(np.float32)}).to_wire() for _ in range(64)]
    ids: list[str] = [""] * jobs
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def submit(i: int) -> None:
            async with slots, session.post(
                f"{url}{p.infer_path(model)}", data=bodies[i % len(bodies)],
                headers={"Prefer": "respond-async", "Content-Type": p.CONTENT_TYPE},
            ) as r:
                if r.status != 202:
                    raise RuntimeError(f"submit answered {r.status}: {(await r.read())[:300]!r}")
                ids[i] = (await r.json())["id"]

        async def finished(job_id: str) -> bool:
            async with session.get(f"{url}/v1/jobs/{job_id}") as r:
                doc = await r.json()
            if doc["status"] == "failed":
                raise RuntimeError(f"job {job_id} failed: {doc['error']}")
            return bool(doc["status"] == "succeeded")

        t0 = time.perf_counter()
        await asyncio.gather(*(submit(i) for i in range(jobs)))
        # Jobs run oldest first: wait for the last, then make sure of the others.
        pending = ids[::-1]
        deadline = time.monotonic() + 900
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} of {jobs} jobs unfinished after 900 s")
            if await finished(pending[0]):
                pending.pop(0)
            else:
                await asyncio.sleep(0.02)  # every look is server CPU counted as the queue's
        wall = time.perf_counter() - t0
    return ids, wall


async def _result_batches(url: str, ids: list[str]) -> float:
    """The mean batch (rows) the jobs ran in, per job: each result's X-Tandem-Batch-Size."""
    import aiohttp

    sizes = []
    async with aiohttp.ClientSession() as session:
        for job_id in ids:
            async with session.get(f"{url}/v1/jobs/{job_id}/result") as r:
                await r.read()
                sizes.append(int(r.headers["X-Tandem-Batch-Size"]))
    return statistics.fmean(sizes)


def _embedded(args: argparse.Namespace, tmp: Path, rows: int, batch: int, threads: int, trust: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the server, mean rows per batch it ran) a ``tandem serve`` with
    the embedded queue takes to accept ``args.jobs`` jobs of ``rows`` rows over HTTP and run them."""
    _RUNS.append(None)
    name = f"embedded{rows}r{len(_RUNS)}"
    config = tmp / f"{name}.json"
    config.write_text(json.dumps({
        "batching": {"max_batch_size": batch}, "warmup_batch_sizes": [batch], "intra_op_threads": threads, "instances": 1,
        "access_log": False, "jobs": {"store_path": str(tmp / f"{name}.sqlite3")},
    }))
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.shared.cli", "serve", "--repository", str(args.repository), *trust,
         "--port", "0", "--config", str(config)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115 - closed with the process
    )
    try:
        deadline = time.monotonic() + 300
        while not (ready := [line for line in log.read_text().splitlines() if line.startswith("ready ")]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        url = ready[0].split()[1]
        asyncio.run(_submit_and_wait(url, args.model, rows, 8))  # warm: the job path, the client
        c0 = _cpu_seconds(proc.pid)
        ids, wall = asyncio.run(_submit_and_wait(url, args.model, rows, args.jobs))
        cpu = _cpu_seconds(proc.pid) - c0
        return wall, cpu, asyncio.run(_result_batches(url, ids))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _embedded_rows(args: argparse.Namespace, tmp: Path, model_file: Path, cores: int, trust: list[str]) -> None:
    """The embedded queue's rows: one ``tandem serve`` (1 instance, every core's intra-op threads)
    against one direct process with the same threads."""
    print(f"\nembedded queue (tandem serve, SQLite WAL synchronous=FULL; {args.jobs} jobs submitted over HTTP, 16 at a time, "
          f"timed from the first submit until all finished), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'rows/job':>8} {'max batch':>9} {'ran':>6} {'threads':>7} | {'direct rows/s':>13} {'serve rows/s':>12} {'ratio':>6} | "
          f"{'CPU us/row: direct (a)':>22} {'direct (b)':>10} {'serve':>7} | {'overhead (a)':>12} {'(b)':>7}")
    summary = []
    for rows in [int(x) for x in args.rows.split(",")]:
        total = rows * args.jobs
        batch = args.batch or rows * 64  # the embedded dispatcher claims 64 jobs at a time
        walls, over_a, over_b, ran = [], [], [], []
        for _ in range(args.repeat):
            a_wall, a_cpu = _direct(model_file, rows, args.jobs, 1, cores)
            e_wall, e_cpu, e_batch = _embedded(args, tmp, rows, batch, cores, trust)
            b_rows = max(rows, round(e_batch))
            b_batches = max(1, total // b_rows)
            b_cpu = a_cpu if b_rows == rows else _direct(model_file, b_rows, b_batches, 1, cores)[1] * total / (b_batches * b_rows)
            walls.append(a_wall / e_wall)
            over_a.append(e_cpu / a_cpu - 1)
            over_b.append(e_cpu / b_cpu - 1)
            ran.append(e_batch)
            print(f"{rows:>8} {batch:>9} {e_batch:>6.0f} {cores:>7} | {total / a_wall:>13,.0f} {total / e_wall:>12,.0f} {a_wall / e_wall:>6.2f} | "
                  f"{a_cpu / total * 1e6:>22.1f} {b_cpu / total * 1e6:>10.1f} {e_cpu / total * 1e6:>7.1f} | {over_a[-1]:>12.1%} {over_b[-1]:>7.1%}",
                  flush=True)
        summary.append((rows, statistics.median(ran), statistics.median(walls), statistics.median(over_a), statistics.median(over_b)))
    print("\nmedians over the repeats (embedded queue): rows/s ratio (serve / direct), CPU per row over direct's (a), (b):")
    for rows, ran_rows, wall, a, b in summary:
        print(f"  {rows} rows/job, batches of {ran_rows:.0f} rows: rows/s ratio {wall:.2f}, CPU overhead per row (a) {a:+.1%}, (b) {b:+.1%}")


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
    ap.add_argument("--claim", type=int, default=64, help="jobs a worker claims at once (tandem worker's default)")
    ap.add_argument("--batch", type=int, default=0,
                    help="the model's max_batch_size: claimed jobs are coalesced into batches of up to this many rows "
                    f"(default: {_WORKER_BATCH} rows, at least one job, for the workers; rows per job x 64 for the "
                    "embedded queue, whose dispatcher claims 64 jobs at a time)")
    ap.add_argument("--repeat", type=int, default=3, help="direct/queue pairs per configuration (alternated)")
    ap.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    ap.add_argument("--queues", default="redis,embedded",
                    help="which queues to measure: redis (tandem worker processes), embedded (tandem serve's SQLite queue)")
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
        queues = set(args.queues.split(","))
        if "redis" not in queues:
            print(f"model {args.model}:{version} ({model_file.name}), {cores} cores")
            _embedded_rows(args, tmp, model_file, cores, trust)
            return 0
        redis = RedisServer(tmp / "redis", appendfsync=args.appendfsync).start()
        try:
            print(f"model {args.model}:{version} ({model_file.name}), {cores} cores, {args.jobs} jobs per run, "
                  f"claim {args.claim}, redis appendonly yes appendfsync {args.appendfsync}, load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
            print(f"{'rows/job':>8} {'max batch':>9} {'ran':>6} {'workers':>7} {'threads':>7} | {'direct rows/s':>13} {'queue rows/s':>12} "
                  f"{'ratio':>6} | {'CPU us/row: direct (a)':>22} {'direct (b)':>10} {'queue':>7} {'(redis)':>7} | "
                  f"{'overhead (a)':>12} {'(b)':>7}")
            summary = []
            for rows in [int(x) for x in args.rows.split(",")]:
                for n in [int(x) for x in args.workers.split(",")]:
                    threads = max(1, cores // n)
                    total = rows * args.jobs
                    # A worker coalesces the jobs it claimed into batches of up to this many rows.
                    batch = args.batch or max(rows, _WORKER_BATCH)
                    walls, over_a, over_b, ran = [], [], [], []
                    for _ in range(args.repeat):  # alternated, so all see the same machine
                        a_wall, a_cpu = _direct(model_file, rows, args.jobs, n, threads)
                        q_wall, w_cpu, r_cpu, q_batch = _queue(args, redis, tmp, rows, batch, n, threads, trust)
                        b_rows = max(rows, round(q_batch))
                        b_cpu = a_cpu if b_rows == rows else _direct(model_file, b_rows, max(n, total // b_rows), n, threads)[1] * (
                            total / (max(n, total // b_rows) * b_rows))
                        q_cpu = w_cpu + r_cpu
                        walls.append(a_wall / q_wall)
                        over_a.append(q_cpu / a_cpu - 1)
                        over_b.append(q_cpu / b_cpu - 1)
                        ran.append(q_batch)
                        print(f"{rows:>8} {batch:>9} {q_batch:>6.0f} {n:>7} {threads:>7} | {total / a_wall:>13,.0f} {total / q_wall:>12,.0f} "
                              f"{a_wall / q_wall:>6.2f} | {a_cpu / total * 1e6:>22.1f} {b_cpu / total * 1e6:>10.1f} {q_cpu / total * 1e6:>7.1f} "
                              f"{r_cpu / total * 1e6:>7.1f} | {over_a[-1]:>12.1%} {over_b[-1]:>7.1%}", flush=True)
                    summary.append((rows, statistics.median(ran), n, statistics.median(walls), statistics.median(over_a), statistics.median(over_b)))
            print("\nmedians over the repeats: wall-clock rows/s ratio (queue / direct), and the queue's CPU per row over direct's,\n"
                  "(a) direct running each job's rows as one batch, (b) direct running the batches the workers ran:")
            for rows, ran_rows, n, wall, a, b in summary:
                print(f"  {rows} rows/job, {n} worker(s), batches of {ran_rows:.0f} rows: rows/s ratio {wall:.2f}, "
                      f"CPU overhead per row (a) {a:+.1%}, (b) {b:+.1%}")
        finally:
            redis.stop()
        if "embedded" in queues:
            _embedded_rows(args, tmp, model_file, cores, trust)
    return 0


if __name__ == "__main__":
    sys.exit(main())
