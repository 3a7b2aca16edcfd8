"""Data profiles: what a model's inputs and outputs looked like at build time, what they look like
now, and how far apart the two are.

The build writes a :class:`ReferenceProfile` into the signed manifest (``Manifest.profile``); the
cloud tier and the agent keep a :class:`RunningProfile` of what they serve and score it against the
reference. Both describe the same *features*, scalar values computed from each row:

* per input tensor with at most :data:`MAX_ELEMENT_FEATURES` elements per row (tabular rows, the
  64 pixels of an 8x8 digit): every element, plus the row's mean and standard deviation;
* per larger float tensor (images, embeddings): the row's mean, standard deviation and L2 norm;
* per integer tensor with a pad value (token ids, attention masks): the row's length (elements
  other than the pad), and for token ids the mean of ``log2(1 + id)`` over the row's tokens (a
  frequency-bucket proxy: tokenizers give frequent tokens small ids);
* per classifier output: the predicted class and the confidence (max softmax, or max probability);
  per other output: the row's L2 norm (embedding norms, regression magnitudes).

Each feature has fixed bins taken from the reference's quantiles (plus a bin below its minimum, one
above its maximum and one for a value the reference holds as an atom, such as a pixel that is
always 0), so a running profile is a fixed-size count array per feature: bounded memory whatever
the traffic. Scores per feature are the population stability index (PSI) and the two-sample
Kolmogorov-Smirnov distance on the binned distributions; a model's summary score is the largest
PSI over its features. Everything here is pure numpy and vectorised over a batch's rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_BINS",
    "DriftSettings",
    "MAX_ELEMENT_FEATURES",
    "DriftReport",
    "FeatureScore",
    "FeatureSpec",
    "Featurizer",
    "ReferenceProfile",
    "RunningProfile",
    "TensorRange",
    "ValidationQuality",
    "drift_scores",
    "feature_plan",
    "ks_distance",
    "make_reference",
    "psi",
]

PROFILE_VERSION = 1


class DriftSettings(BaseModel):
    """When a running profile counts as drifting, and how much live quality is kept: the same
    meaning on the cloud tier and on a device (each tier's ``monitoring`` section extends it)."""

    model_config = ConfigDict(extra="forbid")

    #: Profile what each model serves and score it against its bundle's reference profile.
    enabled: bool = True
    #: A model is drifting when its summary score (the largest per-feature PSI) reaches this.
    threshold: float = Field(0.25, gt=0)
    #: Rows the running profile covers (the most recent ones profiled).
    window: int = Field(1000, ge=10)
    #: No score (and never "drifting") before the window holds this many rows.
    min_rows: int = Field(500, ge=1)
    #: Labelled answers (feedback) and escalations (route records) the live quality covers.
    quality_window: int = Field(1000, ge=10)

    @model_validator(mode="after")
    def _min_rows_within_window(self) -> DriftSettings:
        if self.min_rows > self.window:
            raise ValueError(f"monitoring.min_rows ({self.min_rows}) cannot exceed monitoring.window ({self.window})")
        return self
#: Quantile bins per feature before the out-of-range and atom bins are added.
DEFAULT_BINS = 10
#: Input tensors with at most this many elements per row are profiled element by element.
MAX_ELEMENT_FEATURES = 64
#: The most features one profile holds (bounds a running profile's memory).
MAX_FEATURES = 512
#: Pseudo-count added to every bin before shares are compared (keeps PSI finite on empty bins).
SMOOTHING = 0.5

Stat = Literal["element", "mean", "std", "norm", "length", "token_log_id", "class", "confidence"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureSpec(_Model):
    """One monitored scalar per row and its reference distribution over fixed bins.

    A value ``x`` falls in bin ``i`` = the number of ``edges`` that are <= ``x`` (so there are
    ``len(edges) + 1`` bins; the first holds values below every edge, the last values above)."""

    name: str
    source: Literal["input", "output"]
    tensor: str
    stat: Stat
    #: Element index in the flattened row (``stat == "element"``).
    index: int | None = None
    #: The tensor's pad value (``length`` and ``token_log_id``).
    pad: float | None = None
    #: Whether the output holds logits (``confidence``: softmax first).
    logits: bool = True
    edges: list[float]
    #: Reference share of rows per bin (``len(edges) + 1`` values summing to 1).
    reference: list[float]
    mean: float
    std: float
    min: float
    max: float


class TensorRange(_Model):
    """What the reference held for one input tensor, for input-quality checks."""

    tensor: str
    min: float
    max: float
    integer: bool = False
    #: The values an integer tensor took when there were few of them (categories), else None.
    categories: list[int] | None = None
    pad: float | None = None
    #: Shortest and longest row (elements other than ``pad``) for tensors with a pad value.
    min_length: int | None = None
    max_length: int | None = None


class ValidationQuality(_Model):
    """The edge against the cloud on the validation split, at build time."""

    n: int
    #: Share of rows where the edge's answer agrees with the cloud's (argmax for classifiers,
    #: the task's per-row verdict otherwise).
    agreement: float | None = None
    edge_accuracy: float | None = None
    cloud_accuracy: float | None = None


class ReferenceProfile(_Model):
    """The reference a running profile is scored against (``Manifest.profile``)."""

    profile_version: int = PROFILE_VERSION
    split: str = "validation"
    n: int
    inputs: list[FeatureSpec]
    #: Output features per variant role ("cloud", "edge"): each tier compares its own variant.
    outputs: dict[str, list[FeatureSpec]] = Field(default_factory=dict)
    ranges: list[TensorRange] = Field(default_factory=list)
    validation: ValidationQuality | None = None

    def features_for(self, role: str) -> list[FeatureSpec]:
        """The input features and ``role``'s output features (none if the role has none)."""
        return [*self.inputs, *self.outputs.get(role, [])]


# --- building a reference -----------------------------------------------------------------------


def _as_rows(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 1:
        return a.reshape(len(a), 1)
    return a.reshape(len(a), int(np.prod(a.shape[1:])))


def feature_plan(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray] | None = None,
    *,
    pads: Mapping[str, float | None] | None = None,
    classifier_outputs: Mapping[str, bool] | None = None,
) -> list[dict[str, Any]]:
    """The features to monitor for these tensors (dicts of FeatureSpec's identity fields).

    ``pads``: each input's pad value (None: never padded). ``classifier_outputs``: output name ->
    whether it holds logits, for the outputs to profile as class + confidence; other outputs get
    their row norm."""
    pads = pads or {}
    plan: list[dict[str, Any]] = []
    for name, arr in inputs.items():
        a = np.asarray(arr)
        pad = pads.get(name)
        width = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
        integer = a.dtype.kind in "iub"
        if integer and pad is not None:
            plan.append({"name": f"{name}.length", "source": "input", "tensor": name, "stat": "length", "pad": pad})
            if "mask" not in name.lower():
                plan.append({"name": f"{name}.log_id", "source": "input", "tensor": name, "stat": "token_log_id", "pad": pad})
            continue
        if width <= MAX_ELEMENT_FEATURES:
            plan += [{"name": f"{name}[{i}]", "source": "input", "tensor": name, "stat": "element", "index": i} for i in range(width)]
            if width > 1:
                plan += [{"name": f"{name}.{s}", "source": "input", "tensor": name, "stat": s} for s in ("mean", "std")]
        else:
            plan += [{"name": f"{name}.{s}", "source": "input", "tensor": name, "stat": s} for s in ("mean", "std", "norm")]
    for name in (outputs or {}):
        cls = (classifier_outputs or {}).get(name)
        if cls is not None:
            plan.append({"name": f"{name}.class", "source": "output", "tensor": name, "stat": "class"})
            plan.append({"name": f"{name}.confidence", "source": "output", "tensor": name, "stat": "confidence", "logits": cls})
        else:
            plan.append({"name": f"{name}.norm", "source": "output", "tensor": name, "stat": "norm"})
    if len(plan) > MAX_FEATURES:
        raise ValueError(f"{len(plan)} features to monitor; at most {MAX_FEATURES}")
    return plan


def _edges(values: np.ndarray, stat: str, bins: int, n_classes: int | None) -> np.ndarray:
    """Fixed bin edges for one feature from its reference values."""
    if stat == "class":
        return np.arange(n_classes or 1, dtype=np.float64)[1:] - 0.5
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.zeros(1)
    lo, hi = float(v.min()), float(v.max())
    qs = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)))
    # A value held by many reference rows (a pixel that is always 0, a confidence of exactly 1)
    # gets a bin of its own, so that rows moving just off it are seen.
    vals, counts = np.unique(v, return_counts=True)
    atoms = vals[counts >= max(2, v.size / (2 * bins))]

    def delta(x: float) -> float:
        return 1e-6 * max(1.0, abs(float(x)))

    extra = [a + delta(a) for a in atoms] + [hi + delta(hi), lo]
    return np.unique(np.concatenate([qs, np.asarray(extra, dtype=np.float64)]))


def make_reference(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    *,
    pads: Mapping[str, float | None] | None = None,
    classifier_outputs: Mapping[str, bool] | None = None,
    bins: int = DEFAULT_BINS,
    validation: ValidationQuality | None = None,
    split: str = "validation",
) -> ReferenceProfile:
    """A reference profile from rows of the inputs and, per role, the outputs that variant gave."""
    pads = dict(pads or {})
    n = len(next(iter(inputs.values())))
    outputs = dict(outputs or {})
    first_outputs = next(iter(outputs.values()), {})
    plan = feature_plan(inputs, first_outputs, pads=pads, classifier_outputs=classifier_outputs)
    in_plan = [p for p in plan if p["source"] == "input"]
    out_plan = [p for p in plan if p["source"] == "output"]

    def specs(plan_part: list[dict[str, Any]], role_outputs: Mapping[str, np.ndarray]) -> list[FeatureSpec]:
        if not plan_part:
            return []
        featurizer = Featurizer([_placeholder(p) for p in plan_part])
        values = featurizer.compute(inputs, role_outputs)
        out = []
        for j, p in enumerate(plan_part):
            col = values[:, j]
            n_classes = None
            if p["stat"] == "class":
                n_classes = int(np.asarray(role_outputs[p["tensor"]]).reshape(n, -1).shape[1])
            edges = _edges(col, p["stat"], bins, n_classes)
            share = _Binner([edges], len(edges) + 1).counts(_no_nan(col[:, None]))[0] / max(1, len(col))
            finite = col[np.isfinite(col)] if np.isfinite(col).any() else np.zeros(1)
            out.append(FeatureSpec(
                **p, edges=edges.tolist(), reference=share.tolist(), mean=float(finite.mean()),
                std=float(finite.std()), min=float(finite.min()), max=float(finite.max()),
            ))
        return out

    ranges = []
    for name, arr in inputs.items():
        a = np.asarray(arr)
        integer = a.dtype.kind in "iub"
        pad = pads.get(name)
        r: dict[str, Any] = {"tensor": name, "min": float(a.min()), "max": float(a.max()), "integer": integer, "pad": pad}
        if integer:
            cats = np.unique(a)
            if cats.size <= 256 and pad is None:
                r["categories"] = [int(c) for c in cats]
        if pad is not None:
            lengths = (_as_rows(a) != pad).sum(1)
            r["min_length"], r["max_length"] = int(lengths.min()), int(lengths.max())
        ranges.append(TensorRange(**r))
    return ReferenceProfile(
        split=split, n=n, inputs=specs(in_plan, first_outputs),
        outputs={role: specs(out_plan, outs) for role, outs in outputs.items()},
        ranges=ranges, validation=validation,
    )


def _placeholder(p: Mapping[str, Any]) -> FeatureSpec:
    return FeatureSpec(**p, edges=[0.0], reference=[0.5, 0.5], mean=0.0, std=0.0, min=0.0, max=0.0)


# --- computing features -------------------------------------------------------------------------


class Featurizer:
    """Computes every feature of a batch at once: ``compute(inputs, outputs) -> [rows, k]``."""

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        self.features = list(features)
        # Per tensor, the element indices and the columns they fill (one fancy-index per tensor).
        self._elements: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._others: list[tuple[int, FeatureSpec]] = []
        groups: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        for j, f in enumerate(self.features):
            if f.stat == "element":
                cols, idx = groups.setdefault((f.source, f.tensor), ([], []))
                cols.append(j)
                idx.append(int(f.index or 0))
            else:
                self._others.append((j, f))
        self._elements = {k: (np.asarray(c), np.asarray(i)) for k, (c, i) in groups.items()}
        self.tensors = {(f.source, f.tensor) for f in self.features}

    def compute(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        outputs = outputs or {}
        rows = _rows_of(inputs, outputs)
        out = np.empty((rows, len(self.features)), dtype=np.float64)
        flat: dict[tuple[str, str], np.ndarray] = {}

        def get(source: str, tensor: str) -> np.ndarray:
            key = (source, tensor)
            if key not in flat:
                src = inputs if source == "input" else outputs
                if tensor not in src:
                    raise ValueError(f"the batch has no {source} {tensor!r}, which the profile monitors")
                flat[key] = _as_rows(src[tensor])
            return flat[key]

        for key, (cols, idx) in self._elements.items():
            out[:, cols] = get(*key)[:, idx]
        softmax: dict[str, np.ndarray] = {}
        for j, f in self._others:
            z = get(f.source, f.tensor)
            if f.stat == "mean":
                out[:, j] = z.mean(1, dtype=np.float64)
            elif f.stat == "std":
                out[:, j] = z.std(1, dtype=np.float64)
            elif f.stat == "norm":
                out[:, j] = np.sqrt(np.einsum("ij,ij->i", z, z, dtype=np.float64))
            elif f.stat == "length":
                out[:, j] = (z != f.pad).sum(1)
            elif f.stat == "token_log_id":
                real = z != f.pad
                logs = np.log2(1.0 + np.maximum(z, 0).astype(np.float64))
                out[:, j] = (logs * real).sum(1) / np.maximum(1, real.sum(1))
            elif f.stat == "class":
                out[:, j] = z.argmax(1)
            elif f.stat == "confidence":
                if f.tensor not in softmax:
                    if f.logits:
                        e = np.exp(z - z.max(1, keepdims=True))
                        softmax[f.tensor] = e.max(1) / e.sum(1)
                    else:
                        softmax[f.tensor] = z.max(1)
                out[:, j] = softmax[f.tensor]
        return out


def _rows_of(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> int:
    for arr in (*inputs.values(), *outputs.values()):
        return len(arr)
    return 0


# --- scores -------------------------------------------------------------------------------------


def _shares(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64) + SMOOTHING
    return c / c.sum(axis=-1, keepdims=True)


def psi(live_counts: np.ndarray, reference_share: np.ndarray, reference_n: int) -> np.ndarray:
    """Population stability index per feature (last axis: bins): sum (p - q) ln(p / q) over the
    bins, both distributions smoothed with :data:`SMOOTHING` pseudo-counts. 0 = identical; the
    usual reading is < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift."""
    p = _shares(live_counts)
    q = _shares(np.asarray(reference_share, dtype=np.float64) * reference_n)
    return ((p - q) * np.log(p / q)).sum(axis=-1)


def ks_distance(live_counts: np.ndarray, reference_share: np.ndarray) -> np.ndarray:
    """Kolmogorov-Smirnov distance per feature between the binned distributions (the largest gap
    between the two cumulative shares at a bin edge; a lower bound of the unbinned distance)."""
    c = np.asarray(live_counts, dtype=np.float64)
    p = c / np.maximum(1.0, c.sum(axis=-1, keepdims=True))
    q = np.asarray(reference_share, dtype=np.float64)
    return np.abs(np.cumsum(p, axis=-1) - np.cumsum(q, axis=-1)).max(axis=-1)


@dataclass(slots=True)
class FeatureScore:
    """One feature's scores (plain data: a report holds one per feature, made every interval)."""

    name: str
    psi: float
    ks: float
    live_mean: float | None
    reference_mean: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class DriftReport:
    """Scores of a running profile against its reference."""

    rows: int
    #: The summary: the largest PSI over the features (None until ``rows`` >= min_rows).
    score: float | None
    mean_psi: float | None
    threshold: float
    drifting: bool
    #: Every feature, most drifted first.
    features: list[FeatureScore]


def drift_scores(
    features: Sequence[FeatureSpec], counts: np.ndarray, reference_n: int, sums: np.ndarray | None = None,
    *, threshold: float, min_rows: int,
) -> DriftReport:
    """Score window ``counts`` ([k, bins], padded with zeros past each feature's bins): the same
    numbers as :func:`psi` and :func:`ks_distance` feature by feature, for all features at once."""
    k = len(features)
    rows = int(counts[0].sum()) if k else 0
    nb = counts.shape[1] if k else 0
    mask = np.zeros((k, nb), dtype=bool)
    ref = np.zeros((k, nb))
    for j, f in enumerate(features):
        mask[j, : len(f.reference)] = True
        ref[j, : len(f.reference)] = f.reference
    c = np.where(mask, counts, 0).astype(np.float64)
    p = np.where(mask, c + SMOOTHING, 0.0)
    p /= np.maximum(p.sum(1, keepdims=True), 1e-300)
    q = np.where(mask, ref * reference_n + SMOOTHING, 0.0)
    q /= np.maximum(q.sum(1, keepdims=True), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        psis = np.where(mask, (p - q) * np.log(np.where(mask, p, 1.0) / np.where(mask, q, 1.0)), 0.0).sum(1)
    live = c / np.maximum(1.0, c.sum(1, keepdims=True))
    kss = np.abs(np.cumsum(live, 1) - np.cumsum(ref, 1)).max(1) if k else np.zeros(0)
    order = np.argsort(-psis, kind="stable")
    scores = [
        FeatureScore(
            name=features[j].name, psi=float(psis[j]), ks=float(kss[j]),
            live_mean=float(sums[j] / rows) if sums is not None and rows else None, reference_mean=features[j].mean,
        )
        for j in order
    ]
    ready = rows >= min_rows and bool(scores)
    score = scores[0].psi if ready else None
    mean = float(psis.mean()) if ready else None
    return DriftReport(rows=rows, score=score, mean_psi=mean, threshold=threshold,
                       drifting=bool(score is not None and score >= threshold), features=scores)


# --- the running profile ------------------------------------------------------------------------


def _no_nan(values: np.ndarray) -> np.ndarray:
    """NaN (a model's output can hold one) binned as +inf: the feature's top bin, never another's."""
    if np.isnan(values).any():
        values = np.where(np.isnan(values), np.inf, values)
    return values


def _key(x: np.ndarray, feature: np.ndarray | int) -> np.ndarray:
    """A value of feature ``j`` mapped into (4j, 4j + 2), order kept: every feature's edges then
    live in one sorted array and one ``searchsorted`` bins a whole batch (half the time of a
    broadcast comparison). The same expression keys edges and values, so ties stay exact."""
    return np.arctan(x) * (2.0 / np.pi) + (1.0 + 4.0 * feature)


class _Binner:
    """Bins ``[rows, k]`` feature values into per-feature counts ``[k, nb]``."""

    def __init__(self, edges: Sequence[Sequence[float] | np.ndarray], nb: int) -> None:
        self.k, self.nb = len(edges), nb
        keys = [_key(np.asarray(e, dtype=np.float64), j) for j, e in enumerate(edges)]
        self._sorted = np.concatenate(keys) if keys else np.zeros(0)
        if np.any(np.diff(self._sorted) <= 0):
            raise ValueError("feature edges must be strictly increasing")
        self._starts = np.cumsum([0] + [len(e) for e in edges[:-1]])[None, :].astype(np.int64)
        self._shift = (np.arange(self.k) * nb)[None, :] - self._starts
        self._j = np.arange(self.k, dtype=np.float64)[None, :]
        self.nbytes = self._sorted.nbytes + self._starts.nbytes * 3

    def bins(self, values: np.ndarray) -> np.ndarray:
        """Bin index of each value within its feature: the number of its edges <= the value."""
        return np.searchsorted(self._sorted, _key(values, self._j).ravel(), side="right").reshape(values.shape) - self._starts

    def flat(self, values: np.ndarray) -> np.ndarray:
        """Each value's bin as an index into the ``[k, nb]`` counts, flattened ([rows, k])."""
        return np.searchsorted(self._sorted, _key(values, self._j).ravel(), side="right").reshape(values.shape) + self._shift

    def count(self, flat: np.ndarray) -> np.ndarray:
        return np.bincount(flat.ravel(), minlength=self.k * self.nb).reshape(self.k, self.nb)

    def counts(self, values: np.ndarray) -> np.ndarray:
        return self.count(self.flat(values))



class RunningProfile:
    """A bounded-memory profile of the last ``window`` rows, scored against a reference.

    The window is a ring of ``slots`` count arrays of ``window / slots`` rows each; when the
    current slot is full the oldest is cleared and reused, so the window slides in steps of one
    slot. Memory: ``slots x features x bins`` counts plus per-feature sums, whatever the traffic
    (no raw input is kept). :meth:`observe` is thread-safe (the cloud's instance threads call it).
    """

    def __init__(self, reference: ReferenceProfile, role: str, *, window: int = 2000, slots: int = 10) -> None:
        if window < slots or slots < 1:
            raise ValueError(f"window ({window}) must be at least slots ({slots}) >= 1")
        self.reference = reference
        self.role = role
        self.features = reference.features_for(role)
        self.featurizer = Featurizer(self.features)
        self.window = window
        self.slots = slots
        self._slot_rows = max(1, window // slots)
        k = len(self.features)
        self._nb = max((len(f.edges) + 1 for f in self.features), default=1)
        self._binner = _Binner([f.edges for f in self.features], self._nb)
        self._counts = np.zeros((slots, k, self._nb), dtype=np.int64)
        self._sums = np.zeros((slots, k))
        self._rows = np.zeros(slots, dtype=np.int64)
        self._slot = 0
        self._lock = threading.Lock()
        self._ranges = {r.tensor: r for r in reference.ranges}
        self._cats = {r.tensor: np.asarray(r.categories) for r in reference.ranges if r.categories is not None}
        #: Totals since start: rows seen and rows failing each input-quality check.
        self.totals = {"rows": 0, "nonfinite": 0, "out_of_range": 0, "unseen_category": 0, "length_outlier": 0}
        self.started = time.time()

    @property
    def nbytes(self) -> int:
        """Memory held by the counts (the bound stated in the docs)."""
        return self._counts.nbytes + self._sums.nbytes + self._rows.nbytes + self._binner.nbytes

    def quality_of(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
        """(rows that are fine to profile, rows failing each input-quality check: a row counts
        once per check, whichever of its tensors fails it)."""
        rows = _rows_of(inputs, {})
        ok = np.ones(rows, dtype=bool)
        failed = {k: np.zeros(rows, dtype=bool) for k in ("out_of_range", "unseen_category", "length_outlier")}
        for name, arr in inputs.items():
            r = self._ranges.get(name)
            z = _as_rows(arr)
            body = z
            if r is not None and r.pad is not None:
                real = z != r.pad
                lengths = real.sum(1)
                if r.min_length is not None and r.max_length is not None:
                    failed["length_outlier"] |= (lengths < r.min_length) | (lengths > r.max_length)
                body = np.where(real, z, r.min)
            # Two reductions per row: NaN propagates into min and max, and so does an infinity.
            lo, hi = body.min(1), body.max(1)
            finite = None
            if z.dtype.kind == "f":
                finite = np.isfinite(lo) & np.isfinite(hi)
                ok &= finite
            if r is None:
                continue
            tol = 1e-6 * max(1.0, abs(r.max - r.min))
            with np.errstate(invalid="ignore"):
                out = (lo < r.min - tol) | (hi > r.max + tol)
            failed["out_of_range"] |= out & finite if finite is not None else out
            cats = self._cats.get(name)
            if cats is not None:
                failed["unseen_category"] |= (~np.isin(z, cats)).any(1)
        counts = {"nonfinite": rows - int(ok.sum())}
        counts.update({k: int(v.sum()) for k, v in failed.items()})
        return ok, counts

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> int:
        """Add a batch (inputs and the outputs this role's variant gave). Rows with NaN/Inf inputs
        are counted, not profiled. Returns the rows profiled."""
        if _rows_of(inputs, {}) == 0:
            return 0
        ok, quality = self.quality_of(inputs)
        outputs = outputs or {}
        if not ok.all():  # rows with NaN/Inf inputs are counted above, not profiled
            inputs = {k: np.asarray(v)[ok] for k, v in inputs.items()}
            outputs = {k: np.asarray(v)[ok] for k, v in outputs.items()}
        values = self.featurizer.compute(inputs, outputs) if ok.any() else np.zeros((0, len(self.features)))
        n = len(values)
        flat = self._binner.flat(_no_nan(values))
        with self._lock:
            self.totals["rows"] += len(ok)
            for k, v in quality.items():
                self.totals[k] += v
            done = 0
            while done < n:  # a batch larger than the current slot's room spills into the next
                s = self._slot
                if self._rows[s] >= self._slot_rows:
                    s = self._slot = (s + 1) % self.slots
                    self._counts[s] = 0
                    self._sums[s] = 0.0
                    self._rows[s] = 0
                take = min(n - done, self._slot_rows - int(self._rows[s]))
                self._counts[s] += self._binner.count(flat[done : done + take])
                self._sums[s] += values[done : done + take].sum(0)
                self._rows[s] += take
                done += take
        return n

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(window counts [k, bins], window sums [k], window rows)."""
        with self._lock:
            return self._counts.sum(0), self._sums.sum(0), int(self._rows.sum())

    def report(self, threshold: float, min_rows: int) -> DriftReport:
        counts, sums, _ = self.snapshot()
        return drift_scores(self.features, counts, self.reference.n, sums, threshold=threshold, min_rows=min_rows)

    def histograms(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Reference and live shares per bin of the named features (all when None), for plots."""
        counts, _, rows = self.snapshot()
        out = []
        for j, f in enumerate(self.features):
            if names is not None and f.name not in names:
                continue
            c = counts[j, : len(f.edges) + 1].astype(np.float64)
            out.append({"name": f.name, "edges": f.edges, "reference": f.reference,
                        "live": (c / max(1.0, c.sum())).tolist(), "live_rows": rows})
        return out

    def state(self) -> dict[str, Any]:
        """The window's counts as plain lists (what the agent uploads), plus the totals."""
        counts, _, rows = self.snapshot()
        with self._lock:
            totals = dict(self.totals)
        return {"role": self.role, "window": self.window, "rows": rows, "totals": totals,
                "counts": {f.name: counts[j, : len(f.edges) + 1].tolist() for j, f in enumerate(self.features)}}
