"""Edge confidence calibration, on the VALIDATION split: for each threshold over the edge variant's
confidence, how many inputs stay on the edge, how good the edge is on them, and how good the whole
cascade is (edge on kept inputs, the cloud variant on the rest). "Good" is the task's per-row
verdict (:func:`tandem.quantize.quality.measure`): the right label, or within the tolerance.

The confidence is the max softmax of a classifier; for other tasks it is a small logistic "is the
edge good enough here?" head trained on features of the edge output (its points are computed on
out-of-fold predictions, so the head is never judged on rows it was fitted to), or a function the
spec provides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tandem.shared.bundle import Calibration, CalibrationPoint, ConfidenceHead

from .errors import SpecError

#: The default grid for max-softmax: fine at the high end, where a confident student keeps most inputs.
SOFTMAX_GRID = np.unique(np.concatenate([np.linspace(0.0, 0.9, 19), [0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]]))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def points(conf: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, thresholds: np.ndarray) -> list[CalibrationPoint]:
    out = []
    for t in np.sort(thresholds):
        kept = conf >= t
        out.append(
            CalibrationPoint(
                threshold=float(t),
                keep_share=float(kept.mean()),
                edge_accuracy_kept=float(edge_ok[kept].mean()) if kept.any() else None,
                cascade_accuracy=float(np.where(kept, edge_ok, cloud_ok).mean()),
            )
        )
    return out


def calibrate(
    edge_logits: np.ndarray,
    cloud_logits: np.ndarray,
    y: np.ndarray,
    *,
    edge_variant: str,
    cloud_variant: str,
    thresholds: np.ndarray | None = None,
) -> Calibration:
    """A classifier's calibration over max-softmax, with labels."""
    conf = softmax(edge_logits.astype(np.float64)).max(1)
    pts = points(conf, edge_logits.argmax(1) == y, cloud_logits.argmax(1) == y,
                 SOFTMAX_GRID if thresholds is None else thresholds)
    return Calibration(variant=edge_variant, reference=cloud_variant, confidence="max_softmax", split="validation",
                       n=len(y), points=pts)


def _quantile_grid(conf: np.ndarray, n: int = 41) -> np.ndarray:
    """Thresholds at the confidence's own quantiles (the lowest keeps every row, one above the
    highest keeps none): keep shares spread evenly whatever scale the confidence has."""
    grid = np.quantile(conf, np.linspace(0.0, 1.0, n))
    return np.unique(np.concatenate([grid, [np.nextafter(conf.max(), np.inf)]]))


def fit_head(edge_out: np.ndarray, edge_ok: np.ndarray, output: str, *, seed: int = 0) -> tuple[ConfidenceHead, np.ndarray]:
    """(head, out-of-fold confidence per row): a logistic regression predicting ``edge_ok`` from
    the edge output row and its norm."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    kinds = ["output", "norm"]
    x = ConfidenceHead.features_of(edge_out, kinds)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-12] = 1.0
    xs = (x - mean) / scale
    y = edge_ok.astype(int)
    share = y.mean()
    if share in (0.0, 1.0) or min(y.sum(), len(y) - y.sum()) < 5:
        # Nothing to learn: the edge is always (or never) good enough on validation. A constant head
        # says so; the calibration then keeps everything (or nothing) on the edge.
        bias = float(np.log((share + 1e-3) / (1 - share + 1e-3)))
        head = ConfidenceHead(output=output, features=kinds, mean=mean.tolist(), scale=scale.tolist(),  # type: ignore[arg-type]
                              weights=[0.0] * x.shape[1], bias=bias)
        return head, np.full(len(y), 1.0 / (1.0 + np.exp(-bias)))
    model = LogisticRegression(C=0.1, max_iter=2000)
    folds = StratifiedKFold(n_splits=min(5, int(min(y.sum(), len(y) - y.sum()))), shuffle=True, random_state=seed)
    oof = cross_val_predict(model, xs, y, cv=folds, method="predict_proba")[:, 1]
    model.fit(xs, y)
    head = ConfidenceHead(output=output, features=kinds, mean=mean.tolist(), scale=scale.tolist(),  # type: ignore[arg-type]
                          weights=model.coef_[0].tolist(), bias=float(model.intercept_[0]))
    return head, oof


def calibrate_task(
    edge_out: np.ndarray,
    edge_ok: np.ndarray,
    cloud_ok: np.ndarray,
    *,
    edge_variant: str,
    cloud_variant: str,
    metric: str,
    kind: str,
    output: str,
    edge_outputs: Mapping[str, np.ndarray] | None = None,
    confidence: Callable[..., Any] | None = None,
    seed: int = 0,
) -> Calibration:
    """Calibration for any task: max-softmax for a classifier, the spec's ``confidence`` function
    when given, else a trained head."""
    n = len(edge_ok)
    head = None
    if confidence is not None:
        try:
            conf = np.asarray(confidence(dict(edge_outputs or {output: edge_out})), dtype=np.float64).reshape(-1)
        except Exception as e:
            raise SpecError(f"the spec's confidence function failed on the edge outputs: {type(e).__name__}: {e}") from None
        if len(conf) != n:
            raise SpecError(f"the spec's confidence function returned {len(conf)} values for {n} rows (one per row)")
        kind_name, grid = "custom", _quantile_grid(conf)
    elif kind == "classification":
        conf = softmax(edge_out.reshape(n, -1).astype(np.float64)).max(1)
        kind_name, grid = "max_softmax", SOFTMAX_GRID
    else:
        head, conf = fit_head(edge_out, edge_ok, output, seed=seed)
        kind_name, grid = "head", _quantile_grid(conf)
    return Calibration(variant=edge_variant, reference=cloud_variant, confidence=kind_name,  # type: ignore[arg-type]
                       split="validation", n=n, points=points(conf, edge_ok, cloud_ok, grid), metric=metric, head=head)
