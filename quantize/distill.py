"""Training: the teacher on hard labels, the student from the teacher's soft targets.

Distillation loss (Hinton et al.): ``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
CE(s, y)``; the T² keeps the soft term's gradients the same size as T changes. Each run keeps the
weights of its best validation epoch, and returns per-epoch metrics for the report.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float


@dataclass
class TrainResult:
    model: Any
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    seconds: float = 0.0


def predict_logits(model: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).numpy() for i in range(0, len(x), batch_size)]
        )


def make_views(
    x: np.ndarray,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None,
    n_views: int,
    batch_size: int,
    seed: int,
) -> list[np.ndarray]:
    """The training inputs, then ``n_views - 1`` augmented copies of them, augmented chunk by chunk
    (each batch-sized chunk gets its own draw). Same seed, same views: the baseline and the distilled
    student see exactly the same data, so the comparison between them is fair."""
    rng = np.random.default_rng(seed + 1)
    views = [x]
    if augment is not None:
        for _ in range(max(0, n_views - 1)):
            views.append(np.concatenate([augment(x[i : i + batch_size], rng) for i in range(0, len(x), batch_size)]))
    return views


def train(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    teacher: Any = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    n_views: int = 8,
    threads: int = 1,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` with Adam and a cosine schedule; with a ``teacher`` the loss mixes the
    distillation term by ``alpha``, the teacher read on the same (possibly augmented) batch the
    student sees (``n_views`` augmented copies of the training set, made up front). Returns the model
    with its best-validation weights."""
    import torch

    views = make_views(x_train, augment, n_views, batch_size, seed)
    # The teacher is read once up front on every view, with every core: reading a big teacher on
    # each student batch would cost far more than training the student.
    soft = [predict_logits(teacher, v) for v in views] if teacher is not None else None
    # Tiny models lose more to thread hand-offs than they gain, above all on a busy machine.
    previous_threads = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) < 100_000
    torch.set_num_threads(1 if small else threads)
    try:
        return _train(model, x_train, y_train, x_val, y_val, epochs=epochs, lr=lr, batch_size=batch_size,
                      weight_decay=weight_decay, seed=seed, views=views, soft=soft, temperature=temperature,
                      alpha=alpha, desc=desc, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    views: list[np.ndarray],
    soft: list[np.ndarray] | None,
    temperature: float,
    alpha: float,
    desc: str,
    progress: bool,
) -> TrainResult:
    import time

    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    yt = torch.from_numpy(y_train)
    tviews = [torch.from_numpy(v) for v in views]
    tsoft = [torch.from_numpy(t) for t in soft] if soft is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    result = TrainResult(model=model)
    best_state = copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(yt), generator=g)
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(yt), batch_size):
            idx = perm[i : i + batch_size]
            v = int(rng.integers(len(tviews))) if len(tviews) > 1 else 0
            logits = model(tviews[v][idx])
            loss = F.cross_entropy(logits, yt[idx])
            if tsoft is not None and alpha > 0:
                kl = F.kl_div(
                    F.log_softmax(logits / temperature, dim=1),
                    F.log_softmax(tsoft[v][idx] / temperature, dim=1),
                    reduction="batchmean",
                    log_target=True,
                )
                loss = alpha * temperature**2 * kl + (1 - alpha) * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
            seen += len(idx)
        sched.step()
        val_acc = float((predict_logits(model, x_val).argmax(1) == y_val).mean())
        m = EpochMetrics(epoch + 1, total / seen, correct / seen, val_acc)
        result.history.append(m)
        if val_acc > result.best_val_accuracy or epoch == 0:
            result.best_val_accuracy, result.best_epoch = val_acc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{m.loss:.4f}", train=f"{m.train_accuracy:.3f}", val=f"{val_acc:.3f}", refresh=False)
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
