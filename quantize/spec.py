"""The build spec: what to build (teacher, student, data) and the budgets every variant must meet.

A spec is loaded from one of:

- a directory holding ``spec.py``;
- a ``.py`` file defining ``SPEC`` (a dict or :class:`BuildSpec`);
- a TOML, YAML or JSON file with the same keys, where the factories are ``"module:attr"`` or
  ``"path/to/file.py:attr"`` strings (resolved relative to the file's directory).

``load_data(seed)`` must return ``{"train": (x, y), "val": (x, y), "test": (x, y), "labels": [...]}``
with numpy arrays (``x`` float32 [n, ...], ``y`` int labels); ``teacher()`` and ``student()`` return
``torch.nn.Module`` objects mapping a batch of ``x`` to logits.
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tandem.shared.bundle import NAME_PATTERN

from .errors import SpecError

SPEC_FILE = "spec.py"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    #: torch threads for training big models (small ones always use 1). 1 by default: on a shared
    #: 2-core machine the digits CNN trained 1.8 s/epoch with 1 thread and 4.7 s/epoch with 2.
    threads: int = Field(1, ge=1)


class Budgets(_Model):
    #: Largest accuracy drop (absolute, on the test split) a quantized variant may have vs its fp32 parent.
    max_accuracy_drop: float = Field(0.01, ge=0)
    #: A quantized variant must be at least this many times faster (p50, batch 1) than its fp32 parent,
    #: and not lower in throughput.
    min_speedup: float = Field(1.1, ge=1.0)
    #: Edge accuracy / cloud accuracy must reach this.
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


class BuildSpec(_Model):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    teacher: Callable[[], Any]
    student: Callable[[], Any]
    load_data: Callable[..., Any]
    #: Optional training-time augmentation ``augment(x_batch, rng) -> x_batch`` (numpy, float32), used
    #: for the teacher and both students; distillation then reads the teacher on the augmented batch.
    augment: Callable[..., Any] | None = None
    input_name: str = "input"
    output_name: str = "logits"
    #: Train the teacher from scratch (False when the factory returns a trained model).
    train_teacher: bool = True
    training: Training = Field(default_factory=Training)
    #: Overrides of ``training`` under ``--quick``.
    quick_training: dict[str, Any] = Field(default_factory=lambda: {"teacher_epochs": 3, "student_epochs": 60})
    budgets: Budgets = Field(default_factory=Budgets)
    search: list[QuantConfig] = Field(default_factory=default_search)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    #: Where the spec came from (filled in by :func:`load_spec`).
    source: str = "<python>"

    @field_validator("teacher", "student", "load_data", "augment", mode="before")
    @classmethod
    def _resolve(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None and info.field_name == "augment":
            return v
        if isinstance(v, str):
            base = (info.context or {}).get("base_dir")
            return resolve_factory(v, Path(base) if base else None)
        if not callable(v):
            raise ValueError(f"must be a callable or a 'module:attr' string, not {type(v).__name__}")
        return v

    def effective_training(self, quick: bool) -> Training:
        if not quick:
            return self.training
        try:
            return self.training.model_copy(update=Training.model_validate(
                {**self.training.model_dump(), **self.quick_training}).model_dump())
        except ValidationError as e:
            raise SpecError(f"quick_training in {self.source} is invalid: {e.errors()[0]['msg']}") from None

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
        return self.model_dump(mode="json", exclude={"teacher", "student", "load_data", "augment"})


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]


def load_dataset(spec: BuildSpec, seed: int) -> Dataset:
    """Call the spec's ``load_data`` and check what it returned, naming the first problem."""
    try:
        raw = spec.load_data(seed)
    except TypeError:
        raw = spec.load_data()
    if not isinstance(raw, dict):
        raise SpecError(f"load_data in {spec.source} must return a dict with train/val/test, got {type(raw).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        pair = raw.get(split)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise SpecError(f"load_data in {spec.source}: '{split}' must be an (x, y) pair")
        x, y = np.asarray(pair[0]), np.asarray(pair[1])
        if x.dtype != np.float32:
            raise SpecError(f"load_data in {spec.source}: {split} x must be float32, got {x.dtype}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x) or len(x) == 0:
            raise SpecError(f"load_data in {spec.source}: {split} y must be 1-D integer labels, one per x row")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int64)
    shapes = {arrays[f"x_{s}"].shape[1:] for s in ("train", "val", "test")}
    if len(shapes) != 1:
        raise SpecError(f"load_data in {spec.source}: the splits have different input shapes {shapes}")
    n_classes = int(max(arrays[f"y_{s}"].max() for s in ("train", "val", "test"))) + 1
    labels = raw.get("labels") or [str(i) for i in range(n_classes)]
    if len(labels) < n_classes:
        raise SpecError(f"load_data in {spec.source}: {len(labels)} labels for {n_classes} classes")
    return Dataset(labels=[str(label) for label in labels], **arrays)


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
