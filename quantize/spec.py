"""The build spec: what to build (teacher, student, data) and the budgets every variant must meet.

A spec is loaded from one of:

- a directory holding ``spec.py``;
- a ``.py`` file defining ``SPEC`` (a dict or :class:`BuildSpec`);
- a TOML, YAML or JSON file with the same keys, where the factories are ``"module:attr"`` or
  ``"path/to/file.py:attr"`` strings (resolved relative to the file's directory).

``load_data(seed)`` returns ``{"train": ..., "val": ..., "test": ..., "labels": [...]}`` where each
split is ``(x, y)`` (labelled) or ``x`` alone (measured against the teacher), and ``x`` is one array
(a one-input model) or a dict of arrays keyed by the declared input names. An optional
``"unlabelled"`` entry holds more inputs the student may learn from. ``teacher()`` and ``student()``
return ``torch.nn.Module`` objects called with the inputs in declared order; a teacher may also be a
path to an ``.onnx`` file (no torch needed then).

A spec without ``inputs`` describes the original case: one float32 input named ``input_name``, a
classifier trained from scratch on integer labels.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tandem.shared.bundle import NAME_PATTERN

from .errors import SpecError

SPEC_FILE = "spec.py"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


Dtype = Literal["float32", "float16", "int64", "int32", "bool"]
NUMPY_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "int64": np.int64,
                                "int32": np.int32, "bool": np.bool_}


class TensorDecl(_Model):
    """One model input: name, dtype and shape, the first axis being the batch. A str in ``shape``
    names a dynamic axis (inputs sharing a name share its length); ``pad`` is the value rows may be
    padded with along dynamic axes (0 for token ids and attention masks), which lets the build trim
    and the server batch rows of different lengths."""

    name: str = Field(min_length=1)
    dtype: Dtype = "float32"
    #: None: the batch axis, then the fixed sizes the data has.
    shape: list[int | str] | None = None
    pad: float | None = None

    @field_validator("shape")
    @classmethod
    def _batch_first(cls, v: list[int | str] | None) -> list[int | str] | None:
        if v is not None:
            if not v or not isinstance(v[0], str):
                raise ValueError("the first axis must be the batch axis, named by a string such as 'batch'")
            if any(isinstance(d, int) and d < 1 for d in v):
                raise ValueError("fixed sizes must be positive")
        return v

    def dynamic_axes(self) -> dict[int, str]:
        """Dynamic non-batch axes (position -> name)."""
        return {i: d for i, d in enumerate(self.shape or []) if i > 0 and isinstance(d, str)}


class OutputDecl(_Model):
    name: str = Field(min_length=1)


TaskKind = Literal["classification", "regression", "embedding", "custom"]
DEFAULT_TOLERANCE: dict[str, float] = {"embedding": 0.9, "regression": 0.1, "custom": 0.5}


class TaskSpec(_Model):
    """How quality is measured. ``classification``: accuracy on labels (agreement with the teacher
    without them); ``embedding``: cosine to the reference and top-k retrieval overlap; ``regression``:
    error relative to the reference; ``custom``: ``metric(outputs, reference, labels)`` returns one
    score per row in [0, 1] (higher is better). ``tolerance`` makes a per-row verdict for calibration:
    cosine >= tolerance, relative error <= tolerance, or custom score >= tolerance."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    kind: TaskKind = "classification"
    #: The output the task reads (default: the first).
    output: str | None = None
    tolerance: float | None = Field(None, gt=0)
    metric: Callable[..., Any] | None = None
    metric_name: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,31}$")
    output_is_logits: bool = True
    #: k of the top-k retrieval overlaps reported for embeddings.
    top_k: int = Field(10, ge=1)

    @field_validator("metric", mode="before")
    @classmethod
    def _resolve_metric(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str):
            base = (info.context or {}).get("base_dir")
            return resolve_factory(v, Path(base) if base else None)
        if v is not None and not callable(v):
            raise ValueError(f"must be a callable or a 'module:attr' string, not {type(v).__name__}")
        return v

    def effective_tolerance(self) -> float | None:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE.get(self.kind)

    def quality_name(self) -> str:
        return {"classification": "accuracy", "embedding": "cosine", "regression": "rel_quality"}.get(
            self.kind, self.metric_name or "custom")


class EdgeSpec(_Model):
    """What runs on the device: ``student`` (the spec's student factory, distilled), ``truncate`` (a
    copy of the teacher keeping its first ``layers`` blocks, distilled), ``teacher`` (the teacher
    itself at lower precision), or ``onnx`` (a model file the user already has)."""

    kind: Literal["student", "truncate", "teacher", "onnx"] = "student"
    layers: int = Field(2, ge=1)
    path: str | None = None


class Training(_Model):
    teacher_epochs: int = Field(30, ge=0)
    student_epochs: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    teacher_lr: float = Field(1e-3, gt=0)
    student_lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    #: Distillation temperature; the KL term is scaled by T² so its gradients keep their size.
    temperature: float = Field(4.0, gt=0)
    #: Weight of the soft (teacher) loss; 1 - alpha goes to the hard-label cross-entropy.
    alpha: float = Field(0.5, ge=0, le=1)
    #: Weight of the token-level term when both models define ``hidden_states(*inputs)`` (a
    #: [batch, sequence, width] tensor in a shared space): squared error per real token, relative
    #: to the teacher's token norms. 0 turns it off. A teacher that also defines
    #: ``output_from_hidden(states, *inputs)`` (its output computed from those states) runs over
    #: the training set once instead of twice.
    hidden_weight: float = Field(0.0, ge=0)
    #: Weight of the relational term for embeddings: per row of a batch, the KL divergence between
    #: the teacher's and the student's softmax over cosine similarities to the other rows (divided
    #: by ``relation_temperature``). It teaches which rows are neighbours, what retrieval returns;
    #: 0 turns it off. Needs a teacher to distil from (an embedding or regression task).
    relation_weight: float = Field(0.0, ge=0)
    #: Softmax temperature of the relational term: smaller looks at the nearest neighbours only.
    relation_temperature: float = Field(0.05, gt=0)
    #: Arithmetic of distillation: ``bf16`` runs the teacher's pass over the training inputs (its
    #: targets) and the student's training passes under bfloat16 autocast (weights, optimizer and
    #: losses stay fp32; validation, test references and export are fp32): about 2.5x cheaper
    #: student steps and a 5x cheaper teacher pass for a transformer on a CPU with native bf16
    #: (AVX512-BF16 or AMX). On a CPU without it the build trains in fp32 and says so.
    precision: Literal["fp32", "bf16"] = "fp32"
    #: torch threads for training big models (small ones always use 1). 1 by default: on a shared
    #: 2-core machine the digits CNN trained 1.8 s/epoch with 1 thread and 4.7 s/epoch with 2.
    threads: int = Field(1, ge=1)


class Budgets(_Model):
    #: Largest drop of the task's quality (absolute, on the test split) a quantized variant may have
    #: vs its fp32 parent (accuracy for classification, cosine for embeddings, ...).
    max_accuracy_drop: float = Field(0.01, ge=0)
    #: Variants whose quality differs by less than this count as equally good: the choice then goes
    #: to speed, then size.
    quality_tie: float = Field(0.002, ge=0)
    #: A quantized variant must be at least this many times faster (p50, batch 1) than its fp32 parent,
    #: and not lower in throughput.
    min_speedup: float = Field(1.1, ge=1.0)
    #: Edge quality / cloud quality must reach this.
    edge_min_relative_accuracy: float = Field(0.95, ge=0, le=1)
    #: Cloud p50 / edge p50 must reach this.
    edge_min_speedup: float = Field(1.0, ge=0)
    #: Cloud size / edge size must reach this.
    edge_min_size_ratio: float = Field(1.0, ge=0)


class QuantConfig(_Model):
    """One point in the quantization search."""

    name: str
    format: Literal["qdq", "dynamic"]
    per_channel: bool = True
    activation_type: Literal["int8", "uint8"] = "int8"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    #: None = every op type the quantizer supports (for dynamic: Conv too, which is slow on CPU).
    op_types: list[str] | None = None


def default_search() -> list[QuantConfig]:
    return [
        # S8S8 QDQ per-channel first: ORT's recommended default on x86 with VNNI.
        QuantConfig(name="int8-qdq-pc", format="qdq", per_channel=True),
        QuantConfig(name="int8-qdq", format="qdq", per_channel=False),
        QuantConfig(name="int8-qdq-u8-pc", format="qdq", per_channel=True, activation_type="uint8"),
        QuantConfig(name="int8-qdq-pc-pct", format="qdq", per_channel=True, calibration="percentile"),
        # Dynamic over every op (ConvInteger for CNNs: known slow on CPU, the speed rule must catch it)
        # and restricted to MatMul/Gemm (the usual choice for transformer-like graphs).
        QuantConfig(name="int8-dyn", format="dynamic", per_channel=True),
        QuantConfig(name="int8-dyn-mm", format="dynamic", per_channel=True, op_types=["MatMul", "Gemm"]),
    ]


def quick_search() -> list[QuantConfig]:
    return [c for c in default_search() if c.name in ("int8-qdq-pc", "int8-dyn", "int8-dyn-mm")]


class Evaluation(_Model):
    latency_runs: int = Field(300, ge=10)
    warmup_runs: int = Field(30, ge=1)
    throughput_batch_size: int = Field(64, ge=1)
    throughput_runs: int = Field(30, ge=3)
    #: Threads per session while measuring: 1 keeps the numbers comparable on a shared 2-core machine.
    intra_op_threads: int = Field(1, ge=1)
    #: Training inputs fed to static quantization's calibration (not the edge-confidence calibration).
    calibration_samples: int = Field(256, ge=8)
    n_samples: int = Field(8, ge=1)
    #: How close onnxruntime must be to torch on the exported graph (deep models sum more rounding).
    export_rtol: float = Field(1e-3, gt=0)
    export_atol: float = Field(1e-4, gt=0)


class BuildSpec(_Model):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    #: A factory of a torch module, or the path of an ``.onnx`` file (used as is, no torch).
    teacher: Callable[[], Any] | str
    student: Callable[[], Any] | None = None
    #: None only for an ONNX teacher: the variants are then measured on generated inputs.
    load_data: Callable[..., Any] | None = None
    #: Typed inputs and outputs; None = one float32 input ``input_name`` and one output ``output_name``.
    inputs: list[TensorDecl] | None = None
    outputs: list[OutputDecl] | None = None
    task: TaskSpec = Field(default_factory=TaskSpec)
    edge: EdgeSpec = Field(default_factory=EdgeSpec)
    #: Optional edge confidence ``confidence(outputs: dict[str, ndarray]) -> per-row scores``; the
    #: application passes the same function to ``HybridClient(confidence=...)``.
    confidence: Callable[..., Any] | None = None
    #: Build the fp16 (GPU) variant of the teacher; it is measured and gated like every variant.
    fp16: bool = True
    #: Optional training-time augmentation ``augment(x_batch, rng) -> x_batch`` (numpy, float32), used
    #: for the teacher and both students; distillation then reads the teacher on the augmented batch.
    augment: Callable[..., Any] | None = None
    input_name: str = "input"
    output_name: str = "logits"
    #: Train the teacher on the labels first. Default: True for a spec without ``inputs`` (the
    #: original from-scratch classifier), False otherwise (a pretrained teacher is used as is).
    train_teacher: bool | None = None
    training: Training = Field(default_factory=Training)
    #: Overrides of ``training`` under ``--quick``.
    quick_training: dict[str, Any] = Field(default_factory=lambda: {"teacher_epochs": 3, "student_epochs": 60})
    budgets: Budgets = Field(default_factory=Budgets)
    #: Overrides of ``budgets`` under ``--quick`` (fewer epochs reach less quality).
    quick_budgets: dict[str, Any] = Field(default_factory=dict)
    search: list[QuantConfig] = Field(default_factory=default_search)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    #: Where the spec came from (filled in by :func:`load_spec`).
    source: str = "<python>"

    @field_validator("teacher", "student", "load_data", "augment", "confidence", mode="before")
    @classmethod
    def _resolve(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None and info.field_name != "teacher":
            return v
        if isinstance(v, (str, Path)) and str(v).endswith(".onnx") and info.field_name == "teacher":
            path = Path(v)
            base = (info.context or {}).get("base_dir")
            if not path.is_absolute() and base:
                path = Path(base) / path
            if not path.is_file():
                raise ValueError(f"ONNX file {path} does not exist")
            return str(path)
        if isinstance(v, str):
            base = (info.context or {}).get("base_dir")
            return resolve_factory(v, Path(base) if base else None)
        if not callable(v):
            raise ValueError(f"must be a callable or a 'module:attr' string, not {type(v).__name__}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BuildSpec:
        if self.inputs is not None:
            names = [d.name for d in self.inputs]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"inputs: names must be unique and at least one, got {names}")
        if self.outputs is not None:
            names = [o.name for o in self.outputs]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"outputs: names must be unique and at least one, got {names}")
            if self.task.output is not None and self.task.output not in names:
                raise ValueError(f"task.output {self.task.output!r} is not one of the outputs {names}")
        if self.task.kind == "custom" and self.task.metric is None:
            raise ValueError("task.metric: a custom task needs a metric function 'metric(outputs, reference, labels)'")
        onnx_teacher = isinstance(self.teacher, str)
        if self.edge.kind == "student" and self.student is None:
            raise ValueError("student: edge.kind 'student' needs a student factory (or choose edge.kind "
                             "'truncate', 'teacher' or 'onnx')")
        if self.edge.kind == "onnx" and not self.edge.path:
            raise ValueError("edge.path: edge.kind 'onnx' needs the path of the edge model's .onnx file")
        if onnx_teacher and self.edge.kind in ("student", "truncate"):
            raise ValueError(f"edge.kind {self.edge.kind!r} needs a torch teacher to distil from; with an ONNX "
                             "teacher use edge.kind 'teacher' (int8 of the same graph) or 'onnx'")
        if onnx_teacher and self.train_teacher:
            raise ValueError("train_teacher: an ONNX teacher cannot be trained")
        if self.training.relation_weight > 0 and (self.task.kind == "classification" or self.edge.kind not in ("student", "truncate")):
            raise ValueError("training.relation_weight: the relational term distils an embedding (or regression) "
                             f"output into a student; this spec's task is {self.task.kind!r} with edge.kind "
                             f"{self.edge.kind!r}, so it would never apply: set it to 0")
        if self.load_data is None and not onnx_teacher:
            raise ValueError("load_data: a torch teacher needs data to export, distil and measure on")
        return self

    @property
    def typed(self) -> bool:
        """True when the spec declares its inputs (the general form)."""
        return self.inputs is not None

    @property
    def onnx_teacher(self) -> Path | None:
        return Path(self.teacher) if isinstance(self.teacher, str) else None

    def should_train_teacher(self) -> bool:
        return self.train_teacher if self.train_teacher is not None else not self.typed and self.onnx_teacher is None

    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs] if self.outputs is not None else [self.output_name]

    def task_output(self) -> str:
        return self.task.output or self.output_names()[0]

    def effective_training(self, quick: bool) -> Training:
        if not quick:
            return self.training
        try:
            return self.training.model_copy(update=Training.model_validate(
                {**self.training.model_dump(), **self.quick_training}).model_dump())
        except ValidationError as e:
            raise SpecError(f"quick_training in {self.source} is invalid: {e.errors()[0]['msg']}") from None

    def effective_budgets(self, quick: bool) -> Budgets:
        if not quick or not self.quick_budgets:
            return self.budgets
        try:
            return Budgets.model_validate({**self.budgets.model_dump(), **self.quick_budgets})
        except ValidationError as e:
            raise SpecError(f"quick_budgets in {self.source} is invalid: {e.errors()[0]['msg']}") from None

    def effective_search(self, quick: bool) -> list[QuantConfig]:
        if not quick:
            return self.search
        names = {c.name for c in quick_search()}
        chosen = [c for c in self.search if c.name in names]
        return chosen or self.search[:2]

    def effective_evaluation(self, quick: bool) -> Evaluation:
        if not quick:
            return self.evaluation
        return self.evaluation.model_copy(update={"latency_runs": 100, "warmup_runs": 10, "throughput_runs": 10})

    def config_dict(self) -> dict[str, Any]:
        """The JSON-able part (everything but the factories), recorded in the bundle's provenance."""
        doc = self.model_dump(mode="json", exclude={"teacher", "student", "load_data", "augment", "confidence", "task"})
        doc["task"] = self.task.model_dump(mode="json", exclude={"metric"})
        if self.onnx_teacher is not None:
            doc["teacher"] = self.onnx_teacher.name
        return doc


@dataclass
class Split:
    """One split: named input arrays (same number of rows each) and labels, if any."""

    x: dict[str, np.ndarray]
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.x.values())))

    def take(self, idx: Any) -> Split:
        return Split({k: v[idx] for k, v in self.x.items()}, None if self.y is None else self.y[idx])


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    #: Class names (classification with labels), else None.
    labels: list[str] | None
    #: Extra inputs without labels for the student to learn from (None when the spec gives none).
    unlabelled: dict[str, np.ndarray] | None
    #: The inputs as declared (or derived from the data for a spec without ``inputs``), shapes filled in.
    inputs: list[TensorDecl]

    def pads(self) -> dict[str, float]:
        return {d.name: d.pad for d in self.inputs if d.pad is not None}


_SPLITS = ("train", "val", "test")


def declared_inputs(spec: BuildSpec, sample: Any) -> list[TensorDecl]:
    """The spec's inputs with every shape filled in (a spec without ``inputs`` gets one float32
    input named ``input_name`` with the data's fixed sizes)."""
    if spec.inputs is None and spec.onnx_teacher is not None:
        return graph_inputs(spec.onnx_teacher)
    if spec.inputs is None:
        arr = np.asarray(sample)
        return [TensorDecl(name=spec.input_name, dtype="float32", shape=["batch", *arr.shape[1:]])]
    out = []
    for d in spec.inputs:
        if d.shape is None:
            given = np.asarray(sample[d.name]) if isinstance(sample, dict) and d.name in sample else None
            shape: list[int | str] = ["batch", *(given.shape[1:] if given is not None else ())]
            d = d.model_copy(update={"shape": shape})
        out.append(d)
    return out


def _as_inputs(spec: BuildSpec, decls: list[TensorDecl], x: Any, where: str) -> dict[str, np.ndarray]:
    """Check one split's inputs against the declarations, naming the first problem."""
    if not isinstance(x, dict):
        if len(decls) != 1:
            raise SpecError(f"load_data in {spec.source}: {where} must be a dict of the inputs "
                            f"{[d.name for d in decls]}, got {type(x).__name__}")
        x = {decls[0].name: x}
    missing = [d.name for d in decls if d.name not in x]
    extra = [k for k in x if k not in {d.name for d in decls}]
    if missing or extra:
        raise SpecError(f"load_data in {spec.source}: {where} has inputs {sorted(x)}; the spec declares "
                        f"{[d.name for d in decls]}" + (f" (missing {missing})" if missing else "")
                        + (f" (undeclared {extra})" if extra else ""))
    out: dict[str, np.ndarray] = {}
    n_rows: int | None = None
    axis_len: dict[str, int] = {}
    for d in decls:
        arr = np.asarray(x[d.name])
        want = np.dtype(NUMPY_DTYPES[d.dtype])
        if arr.dtype != want:
            if spec.inputs is None and spec.onnx_teacher is None:
                raise SpecError(f"load_data in {spec.source}: {where} x must be float32, got {arr.dtype}")
            raise SpecError(f"load_data in {spec.source}: {where} input {d.name!r} must be {d.dtype} "
                            f"as declared, got {arr.dtype}")
        shape = d.shape or []
        if arr.ndim != len(shape):
            raise SpecError(f"load_data in {spec.source}: {where} input {d.name!r} has shape {arr.shape}; "
                            f"declared {shape} ({len(shape)} axes)")
        for axis, (size, dim) in enumerate(zip(arr.shape, shape)):
            if isinstance(dim, int) and size != dim:
                raise SpecError(f"load_data in {spec.source}: {where} input {d.name!r} axis {axis} is {size}; "
                                f"declared {dim}")
            if isinstance(dim, str) and axis > 0 and axis_len.setdefault(dim, size) != size:
                raise SpecError(f"load_data in {spec.source}: {where} inputs sharing axis {dim!r} have "
                                f"different lengths ({axis_len[dim]} and {size} in {d.name!r})")
        if n_rows is None:
            n_rows = len(arr)
        if len(arr) != n_rows or len(arr) == 0:
            raise SpecError(f"load_data in {spec.source}: {where} inputs must have the same, non-zero number of rows")
        out[d.name] = np.ascontiguousarray(arr)
    return out


_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                "tensor(int32)": "int32", "tensor(bool)": "bool"}


def graph_inputs(path: Path) -> list[TensorDecl]:
    """An ONNX model's inputs as declarations. Integer inputs named like token ids or masks with a
    dynamic sequence axis get pad 0 (what tokenizers pad with), so rows of different lengths can be
    batched; declare ``inputs`` in a spec to say otherwise."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise SpecError(f"ONNX Runtime cannot load {path}: {first[:300]}") from None
    out = []
    for i in sess.get_inputs():
        if i.type not in _ONNX_DTYPES:
            raise SpecError(f"{path.name}: input {i.name} has type {i.type}, which Tandem does not serve")
        shape: list[int | str] = [d if isinstance(d, int) else (d or f"dim{j}") for j, d in enumerate(i.shape)]
        if not shape or not isinstance(shape[0], str):
            raise SpecError(f"{path.name}: input {i.name} has no dynamic batch axis (shape {i.shape}); "
                            "export it with a dynamic first axis")
        dtype = _ONNX_DTYPES[i.type]
        tokenish = dtype in ("int64", "int32") and any(k in i.name.lower() for k in ("ids", "mask"))
        dynamic_rest = any(isinstance(d, str) for d in shape[1:])
        out.append(TensorDecl(name=i.name, dtype=dtype, shape=shape, pad=0 if tokenish and dynamic_rest else None))  # type: ignore[arg-type]
    return out


def load_dataset(spec: BuildSpec, seed: int, quick: bool = False) -> Dataset:
    """Call the spec's ``load_data`` and check what it returned, naming the first problem. A
    ``load_data`` that takes ``quick`` is told when the build is a quick one (a smaller sample)."""
    import inspect

    if spec.load_data is None:
        raise SpecError(f"{spec.source} has no load_data")
    try:
        params = inspect.signature(spec.load_data).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    try:
        raw = spec.load_data(seed, quick=quick) if "quick" in params else spec.load_data(seed)
    except TypeError:
        raw = spec.load_data()
    if not isinstance(raw, dict):
        raise SpecError(f"load_data in {spec.source} must return a dict with train/val/test, got {type(raw).__name__}")
    splits: dict[str, Split] = {}
    decls: list[TensorDecl] | None = None
    for split in _SPLITS:
        if split not in raw:
            raise SpecError(f"load_data in {spec.source}: '{split}' must be an (x, y) pair or the inputs alone")
        item = raw[split]
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise SpecError(f"load_data in {spec.source}: '{split}' must be an (x, y) pair or the inputs alone")
            x, y = item
        else:
            x, y = item, None
        if decls is None:
            decls = declared_inputs(spec, x)
        inputs = _as_inputs(spec, decls, x, split)
        n = len(next(iter(inputs.values())))
        if y is not None:
            y = np.asarray(y)
            if spec.task.kind == "classification":
                if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != n:
                    raise SpecError(f"load_data in {spec.source}: {split} y must be 1-D integer labels, one per x row")
                y = y.astype(np.int64)
            elif len(y) != n:
                raise SpecError(f"load_data in {spec.source}: {split} y must have one row per x row")
            else:
                y = y.astype(np.float32)
        splits[split] = Split(inputs, y)
    assert decls is not None
    if spec.inputs is None and spec.onnx_teacher is None:
        shapes = {splits[s].x[decls[0].name].shape[1:] for s in _SPLITS}
        if len(shapes) != 1:
            raise SpecError(f"load_data in {spec.source}: the splits have different input shapes {shapes}")
    labelled = [s for s in _SPLITS if splits[s].y is not None]
    if spec.should_train_teacher() and len(labelled) < 3:
        raise SpecError(f"load_data in {spec.source}: training the teacher needs labels in every split "
                        "(set train_teacher = false to use a pretrained teacher as is)")
    labels = None
    if spec.task.kind == "classification" and labelled:
        n_classes = int(max(splits[s].y.max() for s in labelled)) + 1  # type: ignore[union-attr]
        labels = raw.get("labels") or [str(i) for i in range(n_classes)]
        if len(labels) < n_classes:
            raise SpecError(f"load_data in {spec.source}: {len(labels)} labels for {n_classes} classes")
        labels = [str(label) for label in labels]
    elif spec.task.kind == "classification" and raw.get("labels"):
        labels = [str(label) for label in raw["labels"]]
    unlabelled = raw.get("unlabelled")
    if unlabelled is not None:
        unlabelled = _as_inputs(spec, decls, unlabelled, "unlabelled")
    return Dataset(splits["train"], splits["val"], splits["test"], labels, unlabelled, decls)


# --- loading ------------------------------------------------------------------------------------


def resolve_factory(ref: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """``"package.module:attr"`` or ``"file.py:attr"`` (relative to ``base_dir``) -> the callable."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"{ref!r} must look like 'module:attr' or 'file.py:attr'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        module = _import_file(path)
    else:
        added = base_dir is not None and str(base_dir) not in sys.path
        if added:
            sys.path.insert(0, str(base_dir))
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"cannot import module {target!r} for {ref!r}: {e}") from None
        finally:
            if added:
                sys.path.remove(str(base_dir))
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"{target} has no attribute {attr!r}")
    if not callable(obj):
        raise ValueError(f"{ref} is not callable")
    return obj


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    name = f"tandem_spec_{abs(hash(str(path.resolve())))}"
    # A spec's own helpers (models.py, data.py beside it) import as plain modules; another spec's
    # module of the same name, imported earlier in this process, must not stand in for them.
    here = path.parent.resolve()
    if str(here) in sys.path:
        sys.path.remove(str(here))
    sys.path.insert(0, str(here))
    for sibling in here.glob("*.py"):
        loaded = sys.modules.get(sibling.stem)
        where = getattr(loaded, "__file__", None)
        if loaded is not None and where and Path(where).resolve().parent != here:
            del sys.modules[sibling.stem]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except SpecError:
        raise
    except Exception as e:
        sys.modules.pop(name, None)
        raise SpecError(f"importing {path} failed: {type(e).__name__}: {e}") from None
    return module


def load_spec(source: str | Path) -> BuildSpec:
    """Load a build spec from a directory, a ``.py`` file, or a TOML/YAML/JSON file."""
    path = Path(source)
    if not path.exists():
        raise SpecError(f"build spec {path} does not exist")
    if path.is_dir():
        if not (path / SPEC_FILE).is_file():
            raise SpecError(f"{path} is a directory without {SPEC_FILE}")
        path = path / SPEC_FILE
    suffix = path.suffix.lower()
    if suffix == ".py":
        module = _import_file(path)
        doc = getattr(module, "SPEC", None)
        if doc is None:
            raise SpecError(f"{path} does not define SPEC (a dict or BuildSpec)")
        if isinstance(doc, BuildSpec):
            doc = {k: getattr(doc, k) for k in doc.model_fields_set}
    elif suffix in (".toml", ".yaml", ".yml", ".json"):
        doc = _read_config(path, suffix)
    else:
        raise SpecError(f"{path}: a build spec is a directory, .py, .toml, .yaml or .json file")
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: the spec must be a mapping, got {type(doc).__name__}")
    doc = {**doc, "source": str(path)}
    try:
        return BuildSpec.model_validate(doc, context={"base_dir": str(path.parent.resolve())})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "spec"
        msg = first["msg"].removeprefix("Value error, ")
        raise SpecError(f"build spec {path}: {loc}: {msg}") from None


def _read_config(path: Path, suffix: str) -> Any:
    text = path.read_text()
    try:
        if suffix == ".toml":
            import tomllib  # Python 3.11+

            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:
        raise SpecError(f"{path} cannot be parsed: {e}") from None
