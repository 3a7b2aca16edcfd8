"""One measurement routine for every variant: quality on the held-out split and latency, measured the
same way, interleaved in one run so that ratios between variants survive a noisy shared machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tandem.shared.bundle import Hardware, VariantMetrics

from .quality import measure, row_cosine

_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "vnni", "bf16")
_TOOLS = ("onnxruntime", "onnx", "torch", "onnxconverter-common", "onnxscript", "numpy", "scikit-learn")


def hardware_info() -> Hardware:
    """This machine: CPU model, cores, the SIMD flags quantized kernels depend on, ORT providers."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
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


class Padding:
    """The padded dynamic axes of a model's inputs (from the spec's declarations): rows padded to a
    common length can be cut back to the longest real row of a batch, which is what a server that
    batches by padding does, and what the latency of one request really is."""

    def __init__(self, decls: Sequence[Any] = ()) -> None:
        self.axes: dict[str, list[tuple[str, int, float]]] = {}
        for d in decls:
            for i, axis in enumerate(d.shape or []):
                if i > 0 and isinstance(axis, str) and d.pad is not None:
                    self.axes.setdefault(axis, []).append((d.name, i, d.pad))

    def __bool__(self) -> bool:
        return bool(self.axes)

    def row_lengths(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per row, the real length of its longest padded axis (0 when nothing is padded)."""
        n = len(next(iter(feeds.values())))
        longest = np.zeros(n, dtype=np.int64)
        for members in self.axes.values():
            for name, i, pad in members:
                a = feeds[name]
                moved = np.moveaxis(a != pad, i, -1).reshape(n, -1, a.shape[i]).any(1)
                real = np.where(moved.any(1), a.shape[i] - np.argmax(moved[:, ::-1], axis=1), 0)
                longest = np.maximum(longest, real)
        return longest

    def trim(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` cut along every padded axis to the longest real content (at least 1)."""
        out = dict(feeds)
        for members in self.axes.values():
            length = 1
            for name, i, pad in members:
                a = feeds[name]
                nz = np.moveaxis(a != pad, i, 0).reshape(a.shape[i], -1).any(1)
                if nz.any():
                    length = max(length, int(len(nz) - np.argmax(nz[::-1])))
            for name, i, _ in members:
                out[name] = np.ascontiguousarray(np.take(out[name], np.arange(length), axis=i))
        return out


def as_feeds(x: np.ndarray | Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    return dict(x) if isinstance(x, Mapping) else {names[0]: x}


def n_rows(feeds: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


def take(feeds: Mapping[str, np.ndarray], idx: Any) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}


def run_batched(  # type: ignore[no-untyped-def]
    sess,
    x: np.ndarray | Mapping[str, np.ndarray],
    batch_size: int = 256,
    *,
    output: str | None = None,
    padding: Padding | None = None,
) -> np.ndarray:
    """One output of ``sess`` (the first, or ``output``) on all of ``x``, in batches. With
    ``padding``, rows are batched by length and each batch is cut to its longest real row (the
    answer is put back in the original order); outputs that keep a padded axis are padded back
    with zeros to a common length."""
    feeds = as_feeds(x, [i.name for i in sess.get_inputs()])
    names = [o.name for o in sess.get_outputs()]
    index = names.index(output) if output is not None else 0
    n = n_rows(feeds)
    order = np.argsort(padding.row_lengths(feeds), kind="stable") if padding else np.arange(n)
    parts = []
    for i in range(0, n, batch_size):
        batch = take(feeds, order[i : i + batch_size])
        if padding:
            batch = padding.trim(batch)
        parts.append(sess.run([names[index]], batch)[0])
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        widest = np.max([p.shape for p in parts], axis=0)
        parts = [np.pad(p, [(0, 0)] + [(0, int(w - s)) for w, s in zip(widest[1:], p.shape[1:])]) for p in parts]
    out = np.concatenate(parts)
    result = np.empty_like(out)
    result[order] = out
    return result


@dataclass
class Timing:
    latencies_ms: np.ndarray
    throughput_per_s: float


def measure_timings(
    paths: dict[str, Path],
    x: np.ndarray | Mapping[str, np.ndarray],
    *,
    runs: int = 300,
    warmup: int = 30,
    throughput_batch_size: int = 64,
    throughput_runs: int = 30,
    intra_op_threads: int = 1,
    padding: Padding | None = None,
    single_rows: int = 64,
) -> dict[str, Timing]:
    """Latency at batch 1 and throughput at ``throughput_batch_size`` for every variant, round-robin
    in small blocks so that a burst of load from elsewhere hits all variants alike. With ``padding``
    the batch-1 requests cycle over ``single_rows`` real rows, each cut to its own length (mixed
    lengths, as callers send them), and the throughput batch is cut to its longest row."""
    sessions = {k: make_session(p, intra_op_threads) for k, p in paths.items()}
    first = next(iter(sessions.values()))
    feeds = as_feeds(x, [i.name for i in first.get_inputs()])
    n = n_rows(feeds)
    if padding:
        ones = [padding.trim(take(feeds, slice(i, i + 1))) for i in range(min(n, single_rows))]
    else:
        ones = [take(feeds, slice(0, 1))]
    big = {k: np.ascontiguousarray(np.resize(v, (throughput_batch_size, *v.shape[1:])).astype(v.dtype)) for k, v in feeds.items()}
    if padding:
        big = padding.trim(big)
    for s in sessions.values():
        for j in range(warmup):
            s.run(None, ones[j % len(ones)])
        s.run(None, big)
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    block = 10
    for start in range(0, runs, block):
        for k, s in sessions.items():
            for j in range(start, start + block):
                feed = ones[j % len(ones)]
                t0 = time.perf_counter()
                s.run(None, feed)
                lat[k].append((time.perf_counter() - t0) * 1e3)
    busy: dict[str, float] = {k: 0.0 for k in sessions}
    for _ in range(throughput_runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, big)
            busy[k] += time.perf_counter() - t0
    return {
        k: Timing(np.asarray(lat[k][:runs]), throughput_runs * throughput_batch_size / busy[k]) for k in sessions
    }


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(row_cosine(a, b).mean())


def evaluate_variants(
    paths: dict[str, Path],
    x_test: np.ndarray | Mapping[str, np.ndarray],
    y_test: np.ndarray | None,
    *,
    reference: str | None = None,
    task: Any = None,
    output: str | None = None,
    padding: Padding | None = None,
    runs: int = 300,
    warmup: int = 30,
    throughput_batch_size: int = 64,
    throughput_runs: int = 30,
    intra_op_threads: int = 1,
    hardware: Hardware | None = None,
) -> tuple[dict[str, VariantMetrics], dict[str, np.ndarray]]:
    """(metrics, test outputs) of every variant: the task's quality (accuracy, agreement and cosine
    for classifiers) against labels or the ``reference`` variant, latency p50/p99 at batch 1,
    throughput, the provider really used and the tool versions."""
    from .spec import TaskSpec

    task = task or TaskSpec()
    hw = hardware or hardware_info()
    versions = tool_versions()
    outputs, providers = {}, {}
    for k, p in paths.items():
        sess = make_session(p, intra_op_threads)
        providers[k] = sess.get_providers()[0]
        outputs[k] = run_batched(sess, x_test, output=output, padding=padding)
    timings = measure_timings(
        paths,
        x_test,
        runs=runs,
        warmup=warmup,
        throughput_batch_size=throughput_batch_size,
        throughput_runs=throughput_runs,
        intra_op_threads=intra_op_threads,
        padding=padding,
    )
    ref = outputs.get(reference) if reference else None
    metrics = {}
    for k in paths:
        q = measure(task, outputs[k], ref, y_test)
        lat = timings[k].latencies_ms
        metrics[k] = VariantMetrics(
            accuracy=q.accuracy,
            agreement=q.agreement,
            cosine=q.cosine,
            quality=q.value,
            metrics=q.extra,
            n_eval=len(outputs[k]),
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
