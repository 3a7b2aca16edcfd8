"""The build's reference profile: what the validation split and the shipped variants' answers on
it look like, written into the signed manifest (``Manifest.profile``, see
:mod:`tandem.shared.profile`) for the tiers' drift monitors to compare live traffic with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tandem.shared.profile import ReferenceProfile, ValidationQuality, make_reference

__all__ = ["MAX_REFERENCE_ROWS", "reference_profile"]

#: The reference is built from at most this many validation rows (quantiles settle long before).
MAX_REFERENCE_ROWS = 20_000


def _argmax(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(len(a), -1).argmax(1)


def reference_profile(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    *,
    task_kind: str,
    output_is_logits: bool = True,
    pads: Mapping[str, float | None] | None = None,
    labels: np.ndarray | None = None,
    edge_ok: np.ndarray | None = None,
    cloud_ok: np.ndarray | None = None,
    decls: Sequence[Any] = (),
) -> ReferenceProfile:
    """The reference profile of ``inputs`` (validation rows) and ``outputs`` ({role: {output name:
    array}}, one entry per shipped role, "cloud" and "edge").

    Classification outputs are profiled as predicted class and confidence, others by their row
    norm. The validation quality records the edge's agreement with the cloud (argmax for
    classifiers, else the share of rows whose edge answer passes the task's per-row verdict,
    ``edge_ok``) and each tier's accuracy against ``labels`` when there are labels."""
    n = len(next(iter(inputs.values())))
    keep = min(n, MAX_REFERENCE_ROWS)
    inputs = {k: np.asarray(v)[:keep] for k, v in inputs.items()}
    outputs = {role: {k: np.asarray(v)[:keep] for k, v in outs.items()} for role, outs in outputs.items()}
    if pads is None:
        pads = {d.name: d.pad for d in decls}
    classifier = {name: output_is_logits for outs in outputs.values() for name in outs} if task_kind == "classification" else {}
    quality = None
    edge, cloud = outputs.get("edge"), outputs.get("cloud")
    if edge and cloud:
        name = next(iter(edge))
        agreement = None
        if task_kind == "classification":
            agreement = float((_argmax(edge[name]) == _argmax(cloud[name])).mean())
        elif edge_ok is not None:
            agreement = float(np.asarray(edge_ok)[:keep].mean())
        edge_acc = cloud_acc = None
        if labels is not None and task_kind == "classification":
            y = np.asarray(labels)[:keep]
            edge_acc = float((_argmax(edge[name]) == y).mean())
            cloud_acc = float((_argmax(cloud[name]) == y).mean())
        elif edge_ok is not None and cloud_ok is not None:
            edge_acc, cloud_acc = float(np.asarray(edge_ok)[:keep].mean()), float(np.asarray(cloud_ok)[:keep].mean())
        quality = ValidationQuality(n=keep, agreement=agreement, edge_accuracy=edge_acc, cloud_accuracy=cloud_acc)
    return make_reference(inputs, outputs, pads=pads, classifier_outputs=classifier, validation=quality)
