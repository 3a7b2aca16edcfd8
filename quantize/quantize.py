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
from typing import Any

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

    # Symbolic shape inference is the step that fails on transformer graphs (it does not know every
    # op the exporter emits); ONNX's own shape inference plus the graph optimisation still apply.
    errors: list[str] = []
    fp32, out = fp32.resolve(), out.resolve()
    for skip_symbolic in (False, True):
        try:
            # A failed symbolic pass leaves a copy of the weights (uuid-named .data) in the working
            # directory: run it where that copy is thrown away with the rest.
            with _quiet(), tempfile.TemporaryDirectory(prefix="tandem-preprocess-") as scratch, contextlib.chdir(scratch):
                quant_pre_process(str(fp32), str(out), skip_symbolic_shape=skip_symbolic)
            note = None if not errors else f"pre-processed without symbolic shape inference ({errors[0]})"
            return out, note
        except Exception as e:  # the library raises many kinds; each is recorded with its reason
            errors.append(f"{type(e).__name__}: {_first_line(e)}")
    log.warning("quant_pre_process failed on %s (%s); quantizing the graph as exported", fp32.name, errors[-1])
    return fp32, f"quant_pre_process failed ({'; then '.join(errors)}); quantized the graph as exported"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:160]


class _Reader:
    """A CalibrationDataReader over real samples, one batch-1 feed at a time (each row cut to its
    real length when the inputs are padded)."""

    def __init__(self, input_name: str, samples: np.ndarray | dict[str, np.ndarray], padding: Any = None) -> None:
        feeds = samples if isinstance(samples, dict) else {input_name: samples}
        n = len(next(iter(feeds.values())))
        rows = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]
        self._feeds = iter([padding.trim(r) for r in rows] if padding else rows)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_static_qdq(
    source: Path, out: Path, cfg: QuantConfig, input_name: str, calib: np.ndarray | dict[str, np.ndarray], padding: Any = None
) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(input_name, calib, padding)
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
    """fp16 weights and compute with the graph's inputs and outputs kept as they are (for the GPU
    variant). What is computed from integer inputs and constants alone (position ids, index
    arithmetic, the attention mask's bias) stays in fp32: fp16 holds integers exactly only up to
    2048, so a token id that went through a float would pick the wrong embedding row."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    g = model.graph
    ints = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)
    derived = {i.name for i in g.input if i.type.tensor_type.elem_type in ints}
    consts = {i.name for i in g.initializer}
    block = []
    for i, n in enumerate(g.node):
        if not n.name:  # the block list goes by node name
            n.name = f"tandem_node_{i}"
        if n.op_type == "Constant":
            consts.update(n.output)
            continue
        used = [v for v in n.input if v]
        if used and any(v in derived for v in used) and all(v in derived or v in consts for v in used):
            block.append(n.name)
            derived.update(n.output)
    with _quiet():
        half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=block)
    onnx.save(half, str(out))


def make_candidates(
    fp32: Path, parent: str, configs: list[QuantConfig], input_name: str, calib: np.ndarray | dict[str, np.ndarray],
    out_dir: Path, padding: Any = None,
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
                try:
                    _quantize(pre, c.path, cfg, input_name, calib, padding)
                except Exception as e:
                    if "ShapeInferenceError" not in str(e):
                        raise
                    # Some onnxruntime releases run ONNX shape inference strictly, and it refuses a
                    # graph whose recorded intermediate shapes (value_info, hints only) disagree
                    # with what it infers; without the hints the same graph quantizes.
                    _quantize(_without_shape_hints(pre, Path(tmp)), c.path, cfg, input_name, calib, padding)
                    c.notes.append(f"quantized without the graph's recorded intermediate shapes ({_first_line(e)})")
                c.size_bytes = c.path.stat().st_size
            except Exception as e:
                c.reason = f"quantization failed: {type(e).__name__}: {str(e)[:200]}"
                log.warning("%s: %s", name, c.reason)
            result.append(c)
    return result


def _without_shape_hints(source: Path, scratch: Path) -> Path:
    import onnx

    out = scratch / f"{source.stem}-no-value-info.onnx"
    if not out.exists():
        model = onnx.load(str(source))
        del model.graph.value_info[:]
        onnx.save(model, str(out))
    return out


def _quantize(source: Path, out: Path, cfg: QuantConfig, input_name: str, calib: np.ndarray | dict[str, np.ndarray],
              padding: Any) -> None:
    if cfg.format == "qdq":
        quantize_static_qdq(source, out, cfg, input_name, calib, padding)
    else:
        quantize_dynamic_int8(source, out, cfg)


def quality(m: VariantMetrics | None) -> float | None:
    """The number budgets read: the task's quality, else accuracy, else agreement."""
    if m is None:
        return None
    for v in (m.quality, m.accuracy, m.agreement):
        if v is not None:
            return v
    return None


def judge(c: Candidate, parent: VariantMetrics, budgets: Budgets, metric: str = "accuracy", gpu: bool = False) -> None:
    """Accept or reject ``c`` against its fp32 parent, recording the reason either way."""
    m = c.metrics
    if m is None:
        c.accepted = False
        c.reason = c.reason or "not measured"
        return
    problems = []
    q, pq = quality(m), quality(parent)
    if q is not None and pq is not None:
        drop = pq - q
        if drop > budgets.max_accuracy_drop:
            problems.append(f"{metric} drop {drop:.4f} > budget {budgets.max_accuracy_drop:.4f} "
                            f"({q:.4f} vs fp32 {pq:.4f})")
    if gpu:
        # Its speed here says nothing: the build machine runs fp16 on the CPU provider.
        c.accepted = not problems
        c.reason = "; ".join(problems) if problems else f"accepted: {metric} {q:.4f} within budget of fp32 (GPU variant; speed not judged on this CPU)"
        return
    speedup = parent.latency_p50_ms / m.latency_p50_ms
    if speedup < budgets.min_speedup:
        slower = " (slower than fp32)" if speedup < 1 else ""
        problems.append(f"p50 speedup {speedup:.2f}x < required {budgets.min_speedup:.2f}x{slower}")
    if m.throughput_per_s < parent.throughput_per_s:
        problems.append(
            f"throughput {m.throughput_per_s:.0f}/s < fp32 parent's {parent.throughput_per_s:.0f}/s"
        )
    c.accepted = not problems
    c.reason = "; ".join(problems) if problems else (
        f"accepted: {speedup:.2f}x faster than fp32, {metric} {q:.4f}" if q is not None else f"accepted: {speedup:.2f}x faster than fp32")


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
        "quality": quality(m),
        "latency_p50_ms": m.latency_p50_ms if m else None,
        "throughput_per_s": m.throughput_per_s if m else None,
    }


def best(candidates: list[Candidate], tie: float = 1.1, quality_tie: float = 0.002) -> Candidate | None:
    """The accepted candidate to ship, by a stated rule: among those within ``tie`` x of the fastest
    p50 (closer than that is measurement noise on a shared machine), those within ``quality_tie``
    of the best quality count as equally good; of these the smallest file wins, then the fastest."""
    ok = [c for c in candidates if c.accepted and c.metrics is not None]
    if not ok:
        return None
    fastest = min(c.metrics.latency_p50_ms for c in ok)  # type: ignore[union-attr]
    near = [c for c in ok if c.metrics.latency_p50_ms <= fastest * tie]  # type: ignore[union-attr]
    top = max(quality(c.metrics) or 0.0 for c in near)
    good = [c for c in near if (quality(c.metrics) or 0.0) >= top - quality_tie]
    return min(good, key=lambda c: (c.size_bytes, c.metrics.latency_p50_ms))  # type: ignore[union-attr]
