"""The task's measure of quality: one number per variant (higher is better) for the budgets, other
measures for the report, and a per-row verdict (is this row's answer good enough?) for calibrating
the edge confidence.

- classification: accuracy on labels; without labels, agreement with the reference's argmax.
- embedding: mean cosine to the reference; beside it two top-k retrieval overlaps (an index of this
  variant's embeddings against one of the reference's, and this variant's queries against the
  reference's in one index of the reference's embeddings); a row is good when its cosine reaches
  the tolerance.
- regression: 1 - mean relative error to the reference (clipped at 0); a row is good when its
  relative error is within the tolerance.
- custom: the spec's ``metric(outputs, reference, labels)``, one score per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SpecError

#: Retrieval overlap compares nearest neighbours among at most this many rows (quadratic cost).
MAX_RETRIEVAL_ROWS = 2000


@dataclass
class Quality:
    value: float
    ok: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None
    agreement: float | None = None
    cosine: float | None = None


def _rows(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _rows(a), _rows(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _unit(m: np.ndarray) -> np.ndarray:
    return m / (np.linalg.norm(m, axis=1, keepdims=True) + 1e-12)


def _neighbours(queries: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """The k rows of ``index`` nearest (by cosine) to each row of ``queries``, row i of the index
    excluded for query i (the same sentence is not its own neighbour)."""
    sim = _unit(queries) @ _unit(index).T
    np.fill_diagonal(sim, -np.inf)
    return np.argpartition(-sim, k - 1, axis=1)[:, :k]


def _agreement(na: np.ndarray, nb: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(x, y, assume_unique=True)) / k for x, y in zip(na, nb)]))


def retrieval_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of each row's k nearest neighbours (by cosine, itself excluded) that ``a`` and
    ``b`` agree on: how much a search index built on ``a`` returns what one built on ``b`` would."""
    return _overlaps(a, b, k)[0]


def query_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of the k results that ``a``'s embedding of each row, as a query, finds in an index
    of ``b``'s embeddings, which ``b``'s own embedding of the row would find too (the row itself
    excluded): what a search whose index was built with the reference model returns for queries
    embedded by this one, e.g. an index built in the cloud searched from the device."""
    return _overlaps(a, b, k)[1]


def _overlaps(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float]:
    """(:func:`retrieval_overlap`, :func:`query_overlap`), finding ``b``'s own neighbours once."""
    a, b = _rows(a)[:MAX_RETRIEVAL_ROWS], _rows(b)[:MAX_RETRIEVAL_ROWS]
    k = min(k, len(a) - 1)
    if k < 1:
        return float("nan"), float("nan")
    reference = _neighbours(b, b, k)
    return _agreement(_neighbours(a, a, k), reference, k), _agreement(_neighbours(a, b, k), reference, k)


def measure(task: Any, out: np.ndarray, reference: np.ndarray | None, labels: np.ndarray | None) -> Quality:
    """Quality of ``out`` (the task output of one variant on the test or validation split)."""
    kind = task.kind
    tol = task.effective_tolerance()
    if kind == "classification":
        pred = out.reshape(len(out), -1).argmax(1)
        agree_rows = pred == reference.reshape(len(reference), -1).argmax(1) if reference is not None else None
        agreement = float(agree_rows.mean()) if agree_rows is not None else None
        cos = float(row_cosine(out, reference).mean()) if reference is not None else None
        if labels is not None:
            ok = pred == labels
            acc = float(ok.mean())
            return Quality(acc, ok, accuracy=acc, agreement=agreement, cosine=cos)
        assert agree_rows is not None, "classification without labels needs a reference"
        return Quality(float(agreement or 0.0), agree_rows, agreement=agreement, cosine=cos)
    if reference is None:
        raise SpecError(f"a {kind} task is measured against a reference variant")
    if kind == "embedding":
        cos_rows = row_cosine(out, reference)
        cos = float(cos_rows.mean())
        own, query = _overlaps(out, reference, task.top_k)
        extra = {f"top{task.top_k}_overlap": own, f"top{task.top_k}_query_overlap": query,
                 "cosine_p10": float(np.percentile(cos_rows, 10))}
        return Quality(cos, cos_rows >= tol, extra, cosine=cos)
    if kind == "regression":
        diff = np.linalg.norm(_rows(out) - _rows(reference), axis=1)
        rel = diff / (np.linalg.norm(_rows(reference), axis=1) + 1e-9)
        extra = {"rel_error": float(rel.mean()), "rel_error_p90": float(np.percentile(rel, 90))}
        if labels is not None:
            extra["mae_to_labels"] = float(np.abs(_rows(out) - _rows(labels)).mean())
        return Quality(float(max(0.0, 1.0 - rel.mean())), rel <= tol, extra)
    scores = np.asarray(task.metric(out, reference, labels), dtype=np.float64).reshape(-1)
    if len(scores) != len(out):
        raise SpecError(f"task.metric returned {len(scores)} scores for {len(out)} rows (it must score every row)")
    return Quality(float(scores.mean()), scores >= tol, {task.quality_name(): float(scores.mean())})


def verdict_name(task: Any, labelled: bool) -> str:
    """How a calibration counts a good row, e.g. ``accuracy`` or ``cosine>=0.9``."""
    if task.kind == "classification":
        return "accuracy" if labelled else "agreement"
    op = "<=" if task.kind == "regression" else ">="
    name = "rel_error" if task.kind == "regression" else task.quality_name()
    return f"{name}{op}{task.effective_tolerance():g}"
