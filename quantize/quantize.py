"""The quantization passes (int8 static QDQ, int8 dynamic, fp16) and the acceptance rule of the
config search: a variant ships only if it stays within the accuracy-drop budget of its fp32 parent
AND is faster than that parent on this machine."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tandem.shared.bundle import VariantMetrics

from .spec import Budgets, QuantConfig

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One quantized variant tried by the search, with the verdict and why."""

    name: str
    config: QuantConfig | None
    path: Path
    parent: str
    precision: str
    notes: list[str] = field(default_factory=list)
    metrics: VariantMetrics | None = None
    accepted: bool = False
    reason: str = ""
    #: The role it ships with in the bundle, or None when it is not shipped.
    role: str | None = None
    size_bytes: int = 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs every tensor at INFO on the root logger and warns through ``warnings``;
    the build prints its own summary, so keep only real warnings from the root logger meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        # The percentile calibrator print()s its histogram settings.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def preprocess(fp32: Path, out: Path) -> tuple[Path, str | None]:
    """ORT's recommended pre-processing (shape inference, graph optimisation) before static
    quantization. It fails on some graphs (e.g. transformer encoders): then the original graph is
    used and the note says so."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(fp32), str(out), skip_symbolic_shape=False)
        return out, None
    except Exception as e:  # the library raises many kinds; any of them means "use the raw graph"
        log.warning("quant_pre_process failed on %s (%s); quantizing the graph as exported", fp32.name, e)
        return fp32, f"quant_pre_process failed ({type(e).__name__}: {str(e)[:120]}); quantized the graph as exported"


class _Reader:
    """A CalibrationDataReader over real samples, one batch-1 feed at a time."""

    def __init__(self, input_name: str, samples: np.ndarray) -> None:
        self._feeds = iter([{input_name: samples[i : i + 1]} for i in range(len(samples))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_static_qdq(source: Path, out: Path, cfg: QuantConfig, input_name: str, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(input_name, calib)
    with _quiet():
        quantize_static(
            str(source),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel,
            activation_type=QuantType.QInt8 if cfg.activation_type == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            op_types_to_quantize=cfg.op_types,
        )


def quantize_dynamic_int8(source: Path, out: Path, cfg: QuantConfig) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(source),
            str(out),
            per_channel=cfg.per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=cfg.op_types,
        )


def convert_fp16(source: Path, out: Path) -> None:
    """fp16 weights and compute with fp32 inputs/outputs kept (for the GPU variant)."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    with _quiet():
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(out))


def make_candidates(
    fp32: Path, parent: str, configs: list[QuantConfig], input_name: str, calib: np.ndarray, out_dir: Path
) -> list[Candidate]:
    """Quantize ``fp32`` once per config. A config the quantizer cannot apply becomes a rejected
    candidate with the error as its reason (the search goes on)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre, pre_note = preprocess(fp32, Path(tmp) / "pre.onnx")
        result = []
        for cfg in configs:
            name = f"{parent.removesuffix('-fp32')}-{cfg.name}"
            c = Candidate(name=name, config=cfg, path=out_dir / f"{name}.onnx", parent=parent,
                          precision="int8-qdq" if cfg.format == "qdq" else "int8-dynamic")
            try:
                if pre_note:
                    c.notes.append(pre_note)
                if cfg.format == "qdq":
                    quantize_static_qdq(pre, c.path, cfg, input_name, calib)
                else:
                    quantize_dynamic_int8(pre, c.path, cfg)
                c.size_bytes = c.path.stat().st_size
            except Exception as e:
                c.reason = f"quantization failed: {type(e).__name__}: {str(e)[:200]}"
                log.warning("%s: %s", name, c.reason)
            result.append(c)
    return result


def judge(c: Candidate, parent: VariantMetrics, budgets: Budgets) -> None:
    """Accept or reject ``c`` against its fp32 parent, recording the reason either way."""
    m = c.metrics
    if m is None:
        c.accepted = False
        c.reason = c.reason or "not measured"
        return
    problems = []
    if m.accuracy is not None and parent.accuracy is not None:
        drop = parent.accuracy - m.accuracy
        if drop > budgets.max_accuracy_drop:
            problems.append(f"accuracy drop {drop:.4f} > budget {budgets.max_accuracy_drop:.4f}")
    speedup = parent.latency_p50_ms / m.latency_p50_ms
    if speedup < budgets.min_speedup:
        slower = " (slower than fp32)" if speedup < 1 else ""
        problems.append(f"p50 speedup {speedup:.2f}x < required {budgets.min_speedup:.2f}x{slower}")
    if m.throughput_per_s < parent.throughput_per_s:
        problems.append(
            f"throughput {m.throughput_per_s:.0f}/s < fp32 parent's {parent.throughput_per_s:.0f}/s"
        )
    c.accepted = not problems
    c.reason = "; ".join(problems) if problems else f"accepted: {speedup:.2f}x faster than fp32"


def summary(c: Candidate) -> dict[str, object]:
    """What the manifest's provenance records of every candidate, shipped or not."""
    m = c.metrics
    return {
        "name": c.name,
        "config": c.config.model_dump() if c.config else None,
        "accepted": c.accepted,
        "shipped_as": c.role,
        "reason": c.reason,
        "size_bytes": c.size_bytes,
        "accuracy": m.accuracy if m else None,
        "latency_p50_ms": m.latency_p50_ms if m else None,
        "throughput_per_s": m.throughput_per_s if m else None,
    }


def best(candidates: list[Candidate], tie: float = 1.1) -> Candidate | None:
    """The accepted candidate to ship: among those within ``tie`` x of the fastest p50 (closer than
    that is measurement noise on a shared machine), the most accurate, then the fastest."""
    ok = [c for c in candidates if c.accepted and c.metrics is not None]
    if not ok:
        return None
    fastest = min(c.metrics.latency_p50_ms for c in ok)  # type: ignore[union-attr]
    near = [c for c in ok if c.metrics.latency_p50_ms <= fastest * tie]  # type: ignore[union-attr]
    return max(near, key=lambda c: (c.metrics.accuracy or 0.0, -c.metrics.latency_p50_ms))  # type: ignore[union-attr]
