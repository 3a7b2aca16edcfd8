"""One measurement routine for every variant: quality on the held-out split and latency, measured the
same way, interleaved in one run so that ratios between variants survive a noisy shared machine."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from tandem.shared.bundle import Hardware, VariantMetrics

_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "vnni", "bf16")
_TOOLS = ("onnxruntime", "onnx", "torch", "onnxconverter-common", "onnxscript", "numpy", "scikit-learn")


def hardware_info() -> Hardware:
    """This machine: CPU model, cores, the SIMD flags quantized kernels depend on, ORT providers."""
    import onnxruntime as ort

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            elif key == "flags" and not flags:
                flags = sorted(f for f in value.split() if f.startswith(_FLAG_PREFIXES))
    except OSError:
        pass
    return Hardware(
        cpu=cpu,
        cores=os.cpu_count() or 1,
        machine=platform.machine(),
        system=platform.system(),
        providers=list(ort.get_available_providers()),
        flags=flags,
    )


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def make_session(path: str | Path, intra_op_threads: int = 1, providers: list[str] | None = None):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def run_batched(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The first output of ``sess`` on all of ``x``, in batches."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@dataclass
class Timing:
    latencies_ms: np.ndarray
    throughput_per_s: float


def measure_timings(
    paths: dict[str, Path],
    x: np.ndarray,
    *,
    runs: int = 300,
    warmup: int = 30,
    throughput_batch_size: int = 64,
    throughput_runs: int = 30,
    intra_op_threads: int = 1,
) -> dict[str, Timing]:
    """Latency at batch 1 and throughput at ``throughput_batch_size`` for every variant, round-robin
    in small blocks so that a burst of load from elsewhere hits all variants alike."""
    sessions = {k: make_session(p, intra_op_threads) for k, p in paths.items()}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    one = x[:1]
    big = np.ascontiguousarray(np.resize(x, (throughput_batch_size, *x.shape[1:])).astype(x.dtype))
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, {names[k]: one})
        s.run(None, {names[k]: big})
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    block = 10
    for _ in range(0, runs, block):
        for k, s in sessions.items():
            feed = {names[k]: one}
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(None, feed)
                lat[k].append((time.perf_counter() - t0) * 1e3)
    busy: dict[str, float] = {k: 0.0 for k in sessions}
    for _ in range(throughput_runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {names[k]: big})
            busy[k] += time.perf_counter() - t0
    return {
        k: Timing(np.asarray(lat[k][:runs]), throughput_runs * throughput_batch_size / busy[k]) for k in sessions
    }


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def evaluate_variants(
    paths: dict[str, Path],
    x_test: np.ndarray,
    y_test: np.ndarray | None,
    *,
    reference: str | None = None,
    runs: int = 300,
    warmup: int = 30,
    throughput_batch_size: int = 64,
    throughput_runs: int = 30,
    intra_op_threads: int = 1,
    hardware: Hardware | None = None,
) -> tuple[dict[str, VariantMetrics], dict[str, np.ndarray]]:
    """(metrics, test outputs) of every variant: accuracy, agreement and cosine with ``reference``,
    latency p50/p99 at batch 1, throughput, the provider really used and the tool versions."""
    hw = hardware or hardware_info()
    versions = tool_versions()
    outputs, providers = {}, {}
    for k, p in paths.items():
        sess = make_session(p, intra_op_threads)
        providers[k] = sess.get_providers()[0]
        outputs[k] = run_batched(sess, x_test)
    timings = measure_timings(
        paths,
        x_test,
        runs=runs,
        warmup=warmup,
        throughput_batch_size=throughput_batch_size,
        throughput_runs=throughput_runs,
        intra_op_threads=intra_op_threads,
    )
    ref = outputs.get(reference) if reference else None
    metrics = {}
    for k in paths:
        out = outputs[k]
        lat = timings[k].latencies_ms
        metrics[k] = VariantMetrics(
            accuracy=accuracy(out, y_test) if y_test is not None else None,
            agreement=float((out.argmax(1) == ref.argmax(1)).mean()) if ref is not None else None,
            cosine=cosine(out, ref) if ref is not None else None,
            n_eval=len(x_test),
            latency_p50_ms=float(np.percentile(lat, 50)),
            latency_p99_ms=float(np.percentile(lat, 99)),
            latency_batch_size=1,
            throughput_per_s=timings[k].throughput_per_s,
            throughput_batch_size=throughput_batch_size,
            intra_op_threads=intra_op_threads,
            provider=providers[k],
            hardware=hw,
            tool_versions=versions,
        )
    return metrics, outputs
