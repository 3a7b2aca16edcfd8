"""Edge confidence calibration, on the VALIDATION split: for each threshold over the edge variant's
max-softmax, how many inputs stay on the edge, how accurate the edge is on them, and how accurate
the whole cascade is (edge on kept inputs, the cloud variant on the rest)."""

from __future__ import annotations

import numpy as np

from tandem.shared.bundle import Calibration, CalibrationPoint


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def calibrate(
    edge_logits: np.ndarray,
    cloud_logits: np.ndarray,
    y: np.ndarray,
    *,
    edge_variant: str,
    cloud_variant: str,
    thresholds: np.ndarray | None = None,
) -> Calibration:
    conf = softmax(edge_logits.astype(np.float64)).max(1)
    edge_right = edge_logits.argmax(1) == y
    cloud_right = cloud_logits.argmax(1) == y
    if thresholds is None:
        # A fixed grid plus the high end, where a confident student keeps most inputs.
        thresholds = np.unique(np.concatenate([np.linspace(0.0, 0.9, 19), [0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]]))
    points = []
    for t in np.sort(thresholds):
        kept = conf >= t
        points.append(
            CalibrationPoint(
                threshold=float(t),
                keep_share=float(kept.mean()),
                edge_accuracy_kept=float(edge_right[kept].mean()) if kept.any() else None,
                cascade_accuracy=float(np.where(kept, edge_right, cloud_right).mean()),
            )
        )
    return Calibration(variant=edge_variant, reference=cloud_variant, confidence="max_softmax", split="validation",
                       n=len(y), points=points)
