"""How close does ``tandem serve`` get to the hardware, and how does it compare with the alternatives?

In one run, per model, on the same cores:

* **limit**: raw ``session.run`` throughput at the best batch size (in this process, nothing else running);
* ``tandem serve`` with the native msgpack protocol, and with Open Inference Protocol v2 binary tensors;
  ``tandem serve --workers N`` (one process and one single-thread session per core, each waiting
  under load for fuller batches with its default ``batching.fill_wait_us``: the throughput
  setting) with the native protocol;
* **naive**: one aiohttp handler with one ``session.run`` per request (``bench/naive_server.py``);
* **litserve**: LitServe with its batching on (``bench/litserve_server.py``; ``--with-litserve``).

Load comes from ``wrk`` (one thread, a Lua script posting a fixed body: a Python client would steal
the server's cores) at each concurrency for a bounded time; every server's answer is checked against
``session.run`` before it is loaded. Prints req/s, p50, p99 and the ratios to the limit, to naive and
to LitServe, plus the mean batch size the server really ran (from its metrics).

Models: ``digits`` (the cloud variant of ``tandem build examples/digits``, from ``--repository``),
``digits-fp32`` (that bundle's fp32 CNN teacher served as the cloud variant),
``mlp`` (tests/support's MLP bundle, all overhead), ``wide`` (64-2048-2048-10), ``heavy``
(64-4096-4096-4096-10, ~34 M multiply-adds per sample, bound by streaming its weights: its limit
is at batch 128), ``conv`` (a 12-layer 256-channel CNN on the input as an 8x8 image, ~415 M
multiply-adds per sample at any batch size: compute dominates) and ``conv64`` (the same with 64
channels, ~26 M multiply-adds per sample: the size of a typical reference CNN).

Text row (``--text-bundle DIR``, a bundle with INT64 [batch, sequence] inputs such as
``tandem build examples/minilm``'s): requests of mixed lengths at 64 connections, ``tandem serve``
padding per batch against every request padded to the longest length, and against raw onnxruntime
on length-sorted batches (``bench/padding.py``, run after the table; its targets: >= 1.5x and >= 75%).

    apt-get install -y wrk                      # Debian/Ubuntu
Old against new (``--against DIR``, a checkout of another commit, e.g. ``git worktree add --detach
/tmp/old <commit>``): each ``tandem serve`` row runs twice, this checkout's server and DIR's
("old ..." rows) up side by side, their wrk runs interleaved at every concurrency; the report adds
new/old per row. A ``--repository`` holding ``digits-fp32/`` serves that bundle as it is (unsigned
checks), so that a bundle both versions read can be given.

    apt-get install -y wrk                      # Debian/Ubuntu
    python bench/serve.py [--repository artifacts/repository] [--models digits,mlp,wide]
                          [--concurrency 1,16,64] [--duration 10] [--repeat 3] [--with-litserve]
                          [--text-bundle artifacts/repository/minilm/1] [--against DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support.py: real ONNX models and signed bundles

from checkout import checkout_env  # noqa: E402
from tandem.shared.bundle import load_bundle, version_key  # noqa: E402
from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, infer_path  # noqa: E402

WRK_LUA = r"""
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
local hl = os.getenv("BENCH_HEADER_LENGTH")
if hl ~= nil and hl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hl end

-- No response() callback: it makes wrk hand every response to Lua, and wrk's CPU comes out of the
-- server's two cores. summary.errors.status already counts the non-2xx/3xx answers.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class Load:
    """What wrk posts: URL path, body bytes and headers."""

    path: str
    body: bytes
    content_type: str
    header_length: int | None = None


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float | None = None
    #: CPU per request: the whole server process, its event-loop thread alone, and wrk (µs).
    server_cpu_us: float | None = None
    loop_cpu_us: float | None = None
    wrk_cpu_us: float | None = None
    #: Mean in-server compute time of one batch, and raw session.run's at that batch size (µs).
    batch_compute_us: float | None = None
    raw_compute_us: float | None = None
    #: req/s of every run of this row (--repeat); the row reports the median run.
    all_rps: list[float] = field(default_factory=list)


@dataclass
class ModelCase:
    name: str  # as served
    repository: Path
    onnx_path: Path
    inputs: dict[str, np.ndarray]  # one sample, batch dim 1
    expected: dict[str, np.ndarray]
    describe: str
    limit: float = 0.0
    limit_batch: int = 0
    limit_at: dict[int, float] = field(default_factory=dict)  # samples/s per batch size (best of the measurements)
    batch1_p50_ms: float = 0.0
    #: Raw batch-1 p50 of a session with the intra-op threads one of ``--workers-row``'s workers gets.
    batch1_worker_p50_ms: float = 0.0
    results: dict[str, dict[int, Run]] = field(default_factory=dict)
    floor: Run | None = None  # the no-op responder at concurrency 1
    unsigned: bool = False  # served with --insecure-skip-signature (a bundle given as it is)


# --- models -------------------------------------------------------------------------------------


def _case(repository: Path, name: str, describe: str) -> ModelCase:
    versions = [p for p in (repository / name).iterdir() if (p / "manifest.json").is_file()]
    bundle = load_bundle(max(versions, key=lambda p: version_key(p.name)), verify_signature=False)
    variant = bundle.variant("cloud")
    inputs, _ = bundle.load_samples()
    one = {k: v[:1] for k, v in inputs.items()}
    expected = _session(bundle.variant_path("cloud"), 1).run(None, one)
    outputs = [o.name for o in bundle.manifest.outputs]
    return ModelCase(
        name, repository, bundle.variant_path("cloud"), one, dict(zip(outputs, expected)),
        f"{name}:{bundle.version} cloud variant {variant.name} ({variant.precision}, {variant.size_bytes / 1e6:.2f} MB)",
    )


# Hidden layers of the generated MLPs: "mlp" is all serving overhead, "wide" in between, "heavy"
# (~34 M multiply-adds per sample) streams 64 MB of weights per run, so its cost per sample falls
# with the batch size up to 128, a batch that 64 connections cannot form.
_MLPS = {"mlp": (128, 128), "wide": (2048, 2048), "heavy": (4096, 4096, 4096)}
# (channels, layers) of the generated CNNs: "conv" (~415 M multiply-adds per sample, 26 MB of
# weights) is where compute dominates: ~4.3 ms of a core per sample at any batch size. "conv64"
# (~26 M multiply-adds per sample) has the raw limit of the reference CNN on these
# 2 cores (~7.8k samples/s, flat from batch 8; 8.2-8.8k measured): the digits teacher here is
# lighter (~17k samples/s, still rising at batch 128), so the same per-request cost is a larger share.
_CNNS = {"conv": (256, 12), "conv64": (64, 12)}


def build_cases(args: argparse.Namespace, tmp: Path, public_key_out: list[Path]) -> list[ModelCase]:
    from support import make_bundle, make_keys

    private, public = make_keys(tmp / "keys")
    public_key_out.append(public)
    cases = []
    for model in args.models:
        if model == "digits":
            repo = Path(args.repository)
            if not (repo / "digits").is_dir():
                print(f"skip digits: no {repo}/digits (run `tandem build examples/digits --repository {repo}`)")
                continue
            cases.append(_case(repo, "digits", "digits"))
        elif model == "digits-fp32" and (Path(args.repository) / "digits-fp32").is_dir():
            cases.append(_case(Path(args.repository), "digits-fp32", "digits-fp32"))
            cases[-1].unsigned = True
        elif model == "digits-fp32":
            repo = Path(args.repository)
            if not (repo / "digits").is_dir():
                print(f"skip digits-fp32: no {repo}/digits")
                continue
            cases.append(_case(_fp32_teacher_repo(repo, tmp, private), "digits-fp32", "digits-fp32"))
        elif model in _MLPS or model in _CNNS:
            repo = tmp / f"repo-{model}"
            if model in _MLPS:
                make_bundle(repo / model / "1", private, name=model, version="1", cloud_hidden=_MLPS[model])
            else:
                make_bundle(repo / model / "1", private, name=model, version="1", cloud_conv=_CNNS[model])
            cases.append(_case(repo, model, model))
        else:
            raise SystemExit(f"unknown model {model!r}: choose from digits, digits-fp32, {', '.join([*_MLPS, *_CNNS])}")
    return cases


def _fp32_teacher_repo(repository: Path, tmp: Path, private_key: Path) -> Path:
    """A copy of the newest digits bundle whose fp32 teacher is the cloud variant (tandem serve
    serves the cloud role; the shipped cloud variant is int8), re-signed with the bench's key."""
    from tandem.shared import signing
    from tandem.shared.bundle import read_manifest, seal_bundle

    versions = [p for p in (repository / "digits").iterdir() if (p / "manifest.json").is_file()]
    src = max(versions, key=lambda p: version_key(p.name))
    dst = tmp / "repo-digits-fp32" / "digits-fp32" / "1"
    shutil.copytree(src, dst)
    _, manifest = read_manifest(dst)
    manifest.name, manifest.version = "digits-fp32", "1"
    for v in manifest.variants:
        if v.role == "cloud":
            v.role = "candidate"
    next(v for v in manifest.variants if v.precision == "fp32" and v.role != "edge").role = "cloud"
    seal_bundle(dst, manifest, signing.load_private_key(private_key))
    return dst.parents[1]


def _session(path: Path, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_times(sess, feeds: dict[str, np.ndarray], seconds: float) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds per session.run of ``feeds``, for ``seconds`` after a short warm-up."""
    for _ in range(5):
        sess.run(None, feeds)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return times


def measure_limit(case: ModelCase, threads: int, seconds: float = 1.5) -> None:
    """Samples/s of plain session.run per batch size, and batch-1 latency, on ``threads``.

    Called before and after the servers run: on a shared machine the best of the two is the
    fairest ceiling (a server is never compared with a limit measured in a quieter moment only)."""
    sess = _session(case.onnx_path, threads)
    for batch in (1, 2, 4, 8, 16, 32, 64, 128):
        times = _run_times(sess, {k: np.repeat(v, batch, axis=0) for k, v in case.inputs.items()}, seconds)
        rate = batch * len(times) / sum(times)
        if batch == 1:
            p50 = statistics.median(times) * 1e3
            case.batch1_p50_ms = min(case.batch1_p50_ms, p50) if case.batch1_p50_ms else p50
        case.limit_at[batch] = max(case.limit_at.get(batch, 0.0), rate)
    case.limit, case.limit_batch = max((r, b) for b, r in case.limit_at.items())


def measure_worker_batch1(case: ModelCase, threads: int, seconds: float = 1.5) -> None:
    """Raw batch-1 p50 with ``threads`` intra-op threads (what each --workers process computes with)."""
    p50 = statistics.median(_run_times(_session(case.onnx_path, threads), case.inputs, seconds)) * 1e3
    case.batch1_worker_p50_ms = min(case.batch1_worker_p50_ms, p50) if case.batch1_worker_p50_ms else p50


def _workers(args: argparse.Namespace) -> int:
    """Server processes tandem runs with (--serve-arg=--workers=N or --serve-env TANDEM_WORKERS=N)."""
    workers = dict(kv.split("=", 1) for kv in args.serve_env).get("TANDEM_WORKERS", "1")
    for i, a in enumerate(args.serve_args):
        if a.startswith("--workers="):
            workers = a.split("=", 1)[1]
        elif a == "--workers" and i + 1 < len(args.serve_args):
            workers = args.serve_args[i + 1]
    return int(workers)


def _batch_time_vs_raw(args: argparse.Namespace, r: Run) -> str:
    workers = _workers(args)
    if workers > 1:  # each worker's session has threads // workers intra-op threads: not the raw run's
        return f"{workers} workers' sessions are not comparable batch for batch with the {args.threads}-thread raw run; "
    return f"in-server batches ran {r.batch_compute_us / r.raw_compute_us:.2f}x raw's time (cores shared with the loop and wrk); "


# --- servers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Server:
    def __init__(self, label: str, cmd: list[str], port: int, ready_path: str, log: Path, env: dict[str, str] | None = None):
        self.label, self.port, self.base = label, port, f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")
        self.log_path = log
        # Own process group: LitServe (and any server with worker processes) leaves its workers
        # running if only the parent is stopped, and they would load every later measurement.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if _http(self.base + ready_path)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{label} not ready in 180 s: {log.read_text()[-2000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Stop the server and every process it started (its process group)."""
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The parent is gone; give its workers a moment, then make sure none is left.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        self._log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def native_load(case: ModelCase) -> Load:
    return Load(infer_path(case.name), InferRequest(case.inputs).to_wire(), CONTENT_TYPE)


def v2_load(case: ModelCase) -> Load:
    header, raw = {"inputs": [], "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in case.expected]}, b""
    for name, arr in case.inputs.items():
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header["inputs"].append({"name": name, "shape": list(arr.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(data)}})
        raw += data
    head = json.dumps(header).encode()
    return Load(f"/v2/models/{case.name}/infer", head + raw, "application/octet-stream", len(head))


def litserve_load(case: ModelCase) -> Load:
    (x,) = case.inputs.values()
    return Load("/predict", json.dumps({"input": x.reshape(-1).tolist()}).encode(), "application/json")


def check_answer(kind: str, server: Server, load: Load, case: ModelCase) -> None:
    """The server must compute the right thing before its speed means anything."""
    headers = {"Content-Type": load.content_type}
    if load.header_length is not None:
        headers["Inference-Header-Content-Length"] = str(load.header_length)
    status, rh, body = _http(server.base + load.path, load.body, headers)
    if status != 200:
        raise RuntimeError(f"{server.label} answered {status}: {body[:300]!r}")
    (want,) = list(case.expected.values())[:1]
    if kind == "native":
        got = next(iter(InferResponse.from_wire(body).outputs.values()))
    elif kind == "v2":
        hl = int(next(v for k, v in rh.items() if k.lower() == "inference-header-content-length"))
        head = json.loads(body[:hl])
        out = head["outputs"][0]
        got = np.frombuffer(body[hl : hl + out["parameters"]["binary_data_size"]], "<f4").reshape(out["shape"])
    else:
        got = np.asarray(json.loads(body)["output"], np.float32).reshape(want.shape)
    # int8/fp16 variants legitimately differ a little between batch sizes; argmax must not.
    if not (np.allclose(got, want, atol=1e-2, rtol=1e-2) and (got.argmax(-1) == want.argmax(-1)).all()):
        raise RuntimeError(f"{server.label} returned wrong outputs: {got.ravel()[:5]} vs {want.ravel()[:5]}")


def wrk(url: str, load: Load, connections: int, seconds: float, tmp: Path) -> Run:
    body_file = tmp / "body.bin"
    body_file.write_bytes(load.body)
    script = tmp / "post.lua"
    script.write_text(WRK_LUA)
    env = {**os.environ, "BENCH_BODY": str(body_file), "BENCH_CONTENT_TYPE": load.content_type,
           "BENCH_HEADER_LENGTH": str(load.header_length or "")}
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script), url + load.path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_RESULT")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    requests, duration_us, p50, p99, status_errors, socket_errors = map(int, line.split()[1:])
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Run(requests / (duration_us / 1e6), p50 / 1e3, p99 / 1e3, status_errors + socket_errors,
               wrk_cpu_us=wrk_cpu / max(requests, 1) * 1e6)


def batch_counters(server: Server, model: str) -> tuple[float, float, float] | None:
    """(rows inferred, batches run, compute µs summed) from the server's /metrics, or None."""
    try:
        from prometheus_client.parser import text_string_to_metric_families

        status, _, body = _http(server.base + "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    rows = execs = compute = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "tandem_inference_count_total":
                rows += s.value
            elif s.name == "tandem_inference_exec_count_total":
                execs += s.value
            elif s.name == "tandem_inference_compute_infer_duration_us_sum":
                compute += s.value
    return rows, execs, compute


def process_cpu(pid: int) -> tuple[float, float] | None:
    """(CPU seconds of the server, of its event-loop threads) from /proc, or None off Linux.

    With ``--workers N`` the server is a supervisor whose worker processes do the work: their
    CPU counts, and each worker's main thread is one event loop."""
    def stat(path: str) -> list[str]:
        # Fields after "pid (comm)": state is [0], ppid [1], utime [11], stime [12] (stat(5)).
        return Path(path).read_text().rsplit(")", 1)[1].split()

    try:
        tick = os.sysconf("SC_CLK_TCK")
        pids = [pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int(stat(f"/proc/{entry.name}/stat")[1]) == pid:
                        pids.append(int(entry.name))
                except (OSError, ValueError, IndexError):
                    continue
        total = loop = 0.0
        for p in pids:
            fields, main = stat(f"/proc/{p}/stat"), stat(f"/proc/{p}/task/{p}/stat")
            total += (int(fields[11]) + int(fields[12])) / tick
            loop += (int(main[11]) + int(main[12])) / tick
    except (OSError, ValueError, IndexError):
        return None
    return total, loop


def load_server(label: str, kind: str, server: Server, load: Load, case: ModelCase, args: argparse.Namespace, tmp: Path) -> None:
    load_servers([(label, server)], kind, load, case, args, tmp)


def load_servers(
    servers: list[tuple[str, Server]], kind: str, load: Load, case: ModelCase, args: argparse.Namespace, tmp: Path
) -> None:
    """Load every server at each concurrency, their runs interleaved (A B A B ...: a change in the
    machine's load falls on both alike); each row is the median of its ``--repeat`` runs."""
    for label, server in servers:
        check_answer(kind, server, load, case)
        wrk(server.base, load, 16, min(2.0, args.duration), tmp)  # warm-up, discarded
        case.results[label] = {}
    for c in args.concurrency:
        runs: dict[str, list[Run]] = {label: [] for label, _ in servers}
        for _ in range(args.repeat):
            for label, server in servers:
                runs[label].append(_measured_run(label, server, load, case, c, args, tmp))
        for label, done in runs.items():
            median = sorted(done, key=lambda r: r.rps)[(len(done) - 1) // 2]  # a run that happened, not a mix
            median.all_rps = [r.rps for r in done]
            case.results[label][c] = median


def _measured_run(label: str, server: Server, load: Load, case: ModelCase, c: int, args: argparse.Namespace, tmp: Path) -> Run:
    before = batch_counters(server, case.name)
    cpu0 = process_cpu(server.proc.pid)
    run = wrk(server.base, load, c, args.duration, tmp)
    cpu1 = process_cpu(server.proc.pid)
    after = batch_counters(server, case.name)
    requests = run.rps * args.duration
    if cpu0 and cpu1 and requests:
        run.server_cpu_us = (cpu1[0] - cpu0[0]) / requests * 1e6
        run.loop_cpu_us = (cpu1[1] - cpu0[1]) / requests * 1e6
    if before and after and after[1] > before[1]:
        run.mean_batch = (after[0] - before[0]) / (after[1] - before[1])
        run.batch_compute_us = (after[2] - before[2]) / (after[1] - before[1])
        run.raw_compute_us = _raw_batch_us(case, run.mean_batch)
    cpu = (f"  cpu/req: server {run.server_cpu_us:.0f} us (loop {run.loop_cpu_us:.0f}), wrk {run.wrk_cpu_us:.0f} us"
           if run.server_cpu_us is not None and run.wrk_cpu_us is not None else "")
    batch = (f"  mean batch {run.mean_batch:.1f}, {run.batch_compute_us / 1e3:.2f} ms per batch"
             f" (raw {run.raw_compute_us / 1e3:.2f})" if run.mean_batch and run.batch_compute_us and run.raw_compute_us else "")
    print(f"  {label:<14} c={c:<3} {run.rps:>9.0f} req/s  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms"
          + batch + cpu + (f"  ERRORS {run.errors}" if run.errors else ""), flush=True)
    return run


def _raw_batch_us(case: ModelCase, batch: float) -> float | None:
    """Raw session.run time of one batch of ``batch`` rows, interpolated between measured sizes."""
    sizes = sorted(case.limit_at)
    if not sizes:
        return None
    lo = max([b for b in sizes if b <= batch], default=sizes[0])
    hi = min([b for b in sizes if b >= batch], default=sizes[-1])
    t_lo, t_hi = lo / case.limit_at[lo], hi / case.limit_at[hi]
    t = t_lo if hi == lo else t_lo + (t_hi - t_lo) * (batch - lo) / (hi - lo)
    return t * 1e6


_SERVE_OTHER = (
    "import argparse, sys; from tandem.cloud.cli import serve; p = argparse.ArgumentParser(); serve(p); "
    "a = p.parse_args(); sys.exit(a.run(a))"
)


def _tandem_servers(
    name: str, case: ModelCase, args: argparse.Namespace, tmp: Path, trust: list[str], flags: list[str], env: dict[str, str]
) -> list[tuple[str, Server]]:
    """``tandem serve`` of this checkout, labelled ``tandem<name>``, and with ``--against`` DIR's
    (``old<name>``), both up at once so that their runs can be interleaved."""
    checkouts: list[tuple[str, dict[str, str]]] = [("tandem", {})]
    if args.against is not None:
        checkouts.append(("old", checkout_env(args.against, tmp / "against")))
    servers: list[tuple[str, Server]] = []
    try:
        for prefix, checkout in checkouts:
            port, label = _free_port(), prefix + name
            # The other checkout's serve subcommand directly: the `tandem` dispatcher loads the
            # subcommands this checkout's install declares, which another commit may not have.
            serve = ["tandem", "serve"] if not checkout else [sys.executable, "-c", _SERVE_OTHER]
            cmd = [*serve, "--repository", str(case.repository), "--port", str(port), *trust, *args.serve_args, *flags]
            server_env = {**checkout, "TANDEM_ACCESS_LOG": "false", **env, **dict(kv.split("=", 1) for kv in args.serve_env)}
            log = tmp / f"{label.replace(' ', '-')}-{case.name}.log"
            servers.append((label, Server(label, cmd, port, "/v2/health/ready", log, server_env)))
    except BaseException:
        for _, server in servers:
            server.stop()
        raise
    return servers


def bench_case(case: ModelCase, args: argparse.Namespace, public_key: Path, tmp: Path) -> None:
    print(f"\n== {case.describe}", flush=True)
    measure_limit(case, args.threads)
    _print_limit(case, args)

    # The bench signs its own models; the digits bundle was signed by `tandem build`'s key.
    trust = ["--insecure-skip-signature"] if case.name == "digits" or case.unsigned else ["--trusted-key", str(public_key)]
    servers = _tandem_servers("", case, args, tmp, trust, [], {})
    try:
        load_servers([(f"{label} native", server) for label, server in servers], "native", native_load(case), case, args, tmp)
        load_servers([(f"{label} v2", server) for label, server in servers], "v2", v2_load(case), case, args, tmp)
    finally:
        for _, server in servers:
            server.stop()

    # The throughput setting for CPU boxes: one process (event loop) and one single-thread session
    # per core, waiting under load for fuller batches. Its batch-1 compute is slower (one thread),
    # and models bound by memory traffic lose with it, so the default is still one process.
    if args.workers_row > 1 and _workers(args) == 1:
        measure_worker_batch1(case, max(1, args.threads // args.workers_row))
        fill = {} if args.workers_fill_wait_us is None else {"TANDEM_BATCHING__FILL_WAIT_US": str(args.workers_fill_wait_us)}
        servers = _tandem_servers(f" w{args.workers_row}", case, args, tmp, trust, [f"--workers={args.workers_row}"], fill)
        try:
            load_servers(servers, "native", native_load(case), case, args, tmp)
            load_servers([(f"{label} v2", server) for label, server in servers], "v2", v2_load(case), case, args, tmp)
        finally:
            for _, server in servers:
                server.stop()

    # The same server without its front door (cloud/front.py): aiohttp serves every request.
    port = _free_port()
    plain = Server("tandem aiohttp", ["tandem", "serve", "--repository", str(case.repository), "--port", str(port), *trust,
                                      *args.serve_args], port, "/v2/health/ready", tmp / f"tandem-aiohttp-{case.name}.log",
                   {"TANDEM_ACCESS_LOG": "false", **dict(kv.split("=", 1) for kv in args.serve_env), "TANDEM_FRONT_DOOR": "false"})
    try:
        load_server("tandem aiohttp", "native", plain, native_load(case), case, args, tmp)
    finally:
        plain.stop()

    if case.floor is None:
        port = _free_port()
        floor = Server("floor", [sys.executable, str(ROOT / "bench" / "floor_server.py"), "--port", str(port)], port,
                       "/v2/health/ready", tmp / "floor.log")
        try:
            case.floor = wrk(floor.base, native_load(case), 1, args.duration, tmp)
            print(f"  floor (no-op responder) c=1  p50 {case.floor.p50_ms:.3f} ms  (wrk + loopback + a minimal Python server)")
        finally:
            floor.stop()

    port = _free_port()
    naive = Server("naive", [sys.executable, str(ROOT / "bench" / "naive_server.py"), str(case.onnx_path), "--name", case.name,
                             "--port", str(port), "--threads", str(args.threads)], port, "/v2/health/ready", tmp / f"naive-{case.name}.log")
    try:
        load_server("naive aiohttp", "native", naive, native_load(case), case, args, tmp)
    finally:
        naive.stop()

    if args.with_litserve:
        port = _free_port()
        lit = Server("litserve", [args.litserve_python, str(ROOT / "bench" / "litserve_server.py"), str(case.onnx_path),
                                  "--port", str(port), "--threads", str(args.threads)], port, "/health", tmp / f"litserve-{case.name}.log")
        try:
            load_server("litserve", "litserve", lit, litserve_load(case), case, args, tmp)
        finally:
            lit.stop()

    measure_limit(case, args.threads)
    print("  again after the servers (best of both kept):")
    _print_limit(case, args)


def _print_limit(case: ModelCase, args: argparse.Namespace) -> None:
    per_batch = ", ".join(f"{b}: {r:,.0f}" for b, r in sorted(case.limit_at.items()))
    print(f"  limit: {case.limit:,.0f} samples/s (session.run, batch {case.limit_batch}, {args.threads} intra-op threads); "
          f"batch-1 p50 {case.batch1_p50_ms:.3f} ms\n  samples/s by batch size: {per_batch}", flush=True)


def report(cases: list[ModelCase], args: argparse.Namespace) -> None:
    print("\n" + "=" * 110)
    print(f"{'model':<13}{'server':<15}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'% limit':>9}{'% lim<=c':>9}"
          f"{'x naive':>9}{'x litserve':>11}{'p99 vs naive':>14}{'x aiohttp':>11}")
    for case in cases:
        naive = case.results.get("naive aiohttp", {})
        lit = case.results.get("litserve", {})
        plain = case.results.get("tandem aiohttp", {})
        for label, runs in case.results.items():
            for c, r in runs.items():
                xn = f"{r.rps / naive[c].rps:.2f}" if c in naive else "-"
                xl = f"{r.rps / lit[c].rps:.2f}" if c in lit else "-"
                pn = f"{r.p99_ms / naive[c].p99_ms:.2f}" if c in naive else "-"
                xa = f"{r.rps / plain[c].rps:.2f}" if c in plain and label == "tandem native" else "-"
                mb = f"{r.mean_batch:.1f}" if r.mean_batch else "-"
                within = max(rate for b, rate in case.limit_at.items() if b <= max(c, 1))
                spread = (f"  runs {min(r.all_rps):,.0f}-{max(r.all_rps):,.0f} ({100 * min(r.all_rps) / case.limit:.0f}-"
                          f"{100 * max(r.all_rps) / case.limit:.0f}%)" if len(r.all_rps) > 1 else "")
                print(f"{case.name:<13}{label:<15}{c:>5}{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{mb:>7}"
                      f"{100 * r.rps / case.limit:>8.0f}%{100 * r.rps / within:>8.0f}%{xn:>9}{xl:>11}{pn:>14}{xa:>11}"
                      + spread + (f"  errors={r.errors}" if r.errors else ""))
        t1 = case.results.get("tandem native", {}).get(1)
        if t1:
            floor = case.floor.p50_ms if case.floor else 0.0
            print(f"{case.name:<13}limit {case.limit:,.0f} samples/s at batch {case.limit_batch}; overhead at concurrency 1: "
                  f"p50 {t1.p50_ms:.3f} ms - floor {floor:.3f} ms - raw batch-1 {case.batch1_p50_ms:.3f} ms "
                  f"= {t1.p50_ms - floor - case.batch1_p50_ms:.3f} ms")
        o1 = case.results.get("old native", {}).get(1)
        if o1:
            floor = case.floor.p50_ms if case.floor else 0.0
            print(f"{case.name:<13}old native overhead at concurrency 1: p50 {o1.p50_ms:.3f} ms - floor {floor:.3f} ms - raw batch-1 "
                  f"{case.batch1_p50_ms:.3f} ms = {o1.p50_ms - floor - case.batch1_p50_ms:.3f} ms")
        for label, runs in case.results.items():
            old = case.results.get("old" + label.removeprefix("tandem"), {}) if label.startswith("tandem") else {}
            if old:
                ratios = ", ".join(f"c={c} {r.rps / old[c].rps:.3f}" for c, r in runs.items() if c in old)
                print(f"{case.name:<13}{label} new/old req/s: {ratios}")
        for label, runs in case.results.items():
            w1 = runs.get(1) if label.startswith("tandem w") else None
            if w1 and case.batch1_worker_p50_ms:
                floor = case.floor.p50_ms if case.floor else 0.0
                print(f"{case.name:<13}{label} overhead at concurrency 1: p50 {w1.p50_ms:.3f} ms - floor {floor:.3f} ms - raw batch-1 "
                      f"on one worker's threads {case.batch1_worker_p50_ms:.3f} ms = {w1.p50_ms - floor - case.batch1_worker_p50_ms:.3f} ms")
        for c in (64,):
            r = case.results.get("tandem native", {}).get(c)
            if r and r.mean_batch:
                r.raw_compute_us = _raw_batch_us(case, r.mean_batch)  # against the best of both limit measurements
            if r and r.server_cpu_us and r.wrk_cpu_us and r.batch_compute_us and r.raw_compute_us and r.mean_batch:
                raw_per_row = r.raw_compute_us / r.mean_batch * args.threads  # core-µs per sample at that batch
                attainable = args.threads * 1e6 / ((r.loop_cpu_us or 0) + r.wrk_cpu_us + raw_per_row)
                print(f"{case.name:<13}at c={c}: loop {r.loop_cpu_us:.0f} + wrk {r.wrk_cpu_us:.0f} + session.run "
                      f"{raw_per_row:.0f} core-us per request -> at most {attainable:,.0f} req/s on {args.threads} cores "
                      f"({100 * attainable / case.limit:.0f}% of the limit); {_batch_time_vs_raw(args, r)}"
                      f"reached {100 * r.rps / attainable:.0f}% of that bound")
    print("% limit: of the best session.run throughput at any batch size; % lim<=c: of the best at a batch no larger than "
          "the concurrency (the largest batch c connections can form); x aiohttp: tandem native with its front door vs without; "
          "tandem wN: tandem serve --workers N (N processes, one single-thread session each, fill_wait_us 1000 by default), "
          "native protocol; tandem wN v2: the same server, v2 binary")
    print("tandem runs with TANDEM_ACCESS_LOG=false (the naive server and LitServe log nothing either); "
          "its access log cost ~10% at 64 connections when measured (fp32 digits CNN)")
    print("targets: tandem >= 70% of limit at 64 (small model), >= 90% where compute dominates (conv); "
          ">= 2x naive and >= 5x LitServe with lower p99; overhead at c=1 <= 0.3 ms p50")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", default=str(ROOT / "artifacts" / "repository"), help="where `tandem build examples/digits` wrote the digits bundle")
    p.add_argument("--models", default="digits,digits-fp32,mlp,heavy,conv", type=lambda s: s.split(","))
    p.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per server and concurrency")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="runs per server and concurrency; rows report the median run and the range (noisy machines)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores every server may use")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for tandem serve, e.g. TANDEM_BATCHING__MAX_BATCH_SIZE=64 (repeat)")
    p.add_argument("--with-litserve", action="store_true", help="pip-install litserve if missing and include it")
    p.add_argument("--serve-arg", dest="serve_args", action="append", default=[], help="extra flag for tandem serve (repeat)")
    p.add_argument("--workers-row", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="also run tandem serve --workers N, native protocol (default: one per core; 1: skip)")
    p.add_argument("--workers-fill-wait-us", type=int, default=None, metavar="US",
                   help="batching.fill_wait_us of the --workers-row server (default: the server's, 1000 with workers; 0: off)")
    p.add_argument("--text-bundle", type=Path, default=None, metavar="DIR",
                   help="also run the mixed-length text row (bench/padding.py) on this bundle")
    p.add_argument("--against", type=Path, default=None, metavar="DIR",
                   help="another checkout of Tandem (an older commit): its tandem serve rows run beside this one's")
    args = p.parse_args()

    if shutil.which("wrk") is None:
        print("wrk is not installed: `sudo apt-get install -y wrk` (Debian/Ubuntu) or build it from "
              "https://github.com/wg/wrk, then re-run.", file=sys.stderr)
        return 2
    args.litserve_python = _litserve_python() if args.with_litserve else None
    if args.with_litserve and args.litserve_python is None:
        print("note: litserve could not be installed; running without it", file=sys.stderr)
        args.with_litserve = False
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (other work on the machine skews every number)")
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as t:
        tmp = Path(t)
        keys: list[Path] = []
        cases = build_cases(args, tmp, keys)
        for case in cases:
            bench_case(case, args, keys[0], tmp)
        report(cases, args)
    if args.text_bundle is not None:
        return text_row(args)
    return 0


def text_row(args: argparse.Namespace) -> int:
    """The mixed-length text row: bench/padding.py on ``--text-bundle`` at 64 connections."""
    print(f"\ntext row: {args.text_bundle}, requests of 8-64 tokens, 64 connections", flush=True)
    cmd = [sys.executable, str(ROOT / "bench" / "padding.py"), "--bundle", str(args.text_bundle),
           "--duration", str(args.duration), "--repeat", str(max(args.repeat, 1)), "--concurrency", "64",
           "--threads", str(args.threads)]
    return subprocess.run(cmd).returncode


#: What bench/litserve_server.py imports: LitServe, and the same onnxruntime and numpy as this process.
_LITSERVE_CHECK = "import litserve, onnxruntime, numpy"


def _litserve_python() -> str | None:
    """A Python that can run bench/litserve_server.py: this one, else a venv of its own
    (``~/.cache/tandem-bench/litserve``), so installing LitServe's dependencies (FastAPI, uvicorn,
    ...) never changes the environment Tandem runs in.

    The venv is isolated (no system site packages): a venv made from inside another venv would see
    the base interpreter's packages, not the onnxruntime Tandem runs with, and fail at its first
    request. So it gets onnxruntime and numpy itself, at this process's versions: both servers then
    run the same runtime.
    """
    from importlib.metadata import version

    if subprocess.run([sys.executable, "-c", _LITSERVE_CHECK], capture_output=True).returncode == 0:
        return sys.executable
    venv = Path.home() / ".cache" / "tandem-bench" / "litserve"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    if subprocess.run([str(python), "-c", _LITSERVE_CHECK], capture_output=True).returncode != 0:
        pins = [f"onnxruntime=={version('onnxruntime')}", f"numpy=={version('numpy')}"]
        print(f"installing litserve, {', '.join(pins)} into {venv} ...", file=sys.stderr, flush=True)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", "litserve", *pins], timeout=900)
        if r.returncode != 0:
            return None
        check = subprocess.run([str(python), "-c", _LITSERVE_CHECK], capture_output=True, text=True)
        if check.returncode != 0:
            print(f"the LitServe venv still cannot import what it needs: {check.stderr.strip()[-500:]}", file=sys.stderr)
            return None
    return str(python)


if __name__ == "__main__":
    sys.exit(main())
