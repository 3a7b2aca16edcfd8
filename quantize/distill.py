"""Training: the teacher on hard labels, the student from the teacher's soft targets.

Distillation loss (Hinton et al.): ``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
CE(s, y)``; the T² keeps the soft term's gradients the same size as T changes. Each run keeps the
weights of its best validation epoch, and returns per-epoch metrics for the report.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
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


# --- any model: named inputs, any task -----------------------------------------------------------

#: Losses by what the student learns from: labels ("ce"), a classifier teacher's soft targets mixed
#: with labels ("kd"), an embedding teacher ("cosine": 1 - cosine plus MSE, so direction and size
#: both follow the teacher), or a regression teacher ("mse").
Loss = str


def _select(out: Any, index: int) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[index]
    raise TypeError(f"the model returned {type(out).__name__}; return a tensor or a tuple of tensors")


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, shuffle: bool = True) -> list[np.ndarray]:
    """Batches of row indices; rows of similar length go together (sorted within chunks of 50
    batches) so that each batch, cut to its longest row, carries little padding."""
    n = len(lengths)
    order = rng.permutation(n) if shuffle else np.arange(n)
    out: list[np.ndarray] = []
    chunk = batch_size * 50
    for i in range(0, n, chunk):
        part = order[i : i + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(out)  # type: ignore[arg-type]
    return out


def _by_length(
    x: dict[str, np.ndarray], names: list[str], padding: Any, batch_size: int
) -> Iterator[tuple[np.ndarray, tuple[Any, ...]]]:
    """(row indices, input tensors in ``names`` order) per batch of rows of similar length, each
    batch cut to its longest real row."""
    import torch

    n = len(x[names[0]])
    lengths = padding.row_lengths(x) if padding else np.zeros(n, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        feeds = {k: v[idx] for k, v in x.items()}
        if padding:
            feeds = padding.trim(feeds)
        yield idx, tuple(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in names)


def _autocast(precision: str) -> Any:
    """bfloat16 autocast on the CPU for ``"bf16"``, nothing for ``"fp32"``."""
    import contextlib

    import torch

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def predict(
    model: Any, x: dict[str, np.ndarray], names: list[str], *, output_index: int = 0, padding: Any = None,
    batch_size: int = 256, precision: str = "fp32",
) -> np.ndarray:
    """The model's output ``output_index`` on every row of ``x`` (inputs passed in ``names`` order),
    batched by length and cut to each batch's longest row; rows come back in their order.
    ``precision="bf16"`` computes under bfloat16 autocast (for training targets, not for measuring)."""
    import torch

    model.eval()
    indices, parts = [], []
    with torch.no_grad(), _autocast(precision):
        for idx, args in _by_length(x, names, padding, batch_size):
            indices.append(idx)
            parts.append(_select(model(*args), output_index).detach().float().numpy())
    if len({p.shape[1:] for p in parts}) > 1:
        raise ValueError("the task output has a padded axis; name an output without one as task.output")
    out_all = np.concatenate(parts)
    result = np.empty_like(out_all)
    result[np.concatenate(indices)] = out_all
    return result


def predict_hidden(
    model: Any, x: dict[str, np.ndarray], names: list[str], *, padding: Any, batch_size: int = 128,
    output_index: int = 0, precision: str = "fp32",
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """``model.hidden_states`` per row, each cut to its real length and kept in float16 (a corpus
    of token states is large), and — when the model has ``output_from_hidden(states, *inputs)`` —
    its outputs from the same forward pass (else None): the teacher then runs over the training
    set once, not twice. ``precision="bf16"``: the pass runs under bfloat16 autocast (all-MiniLM-L6-v2's
    embeddings then keep cosine 0.99998 to fp32, at a fifth of the CPU time), the head in fp32."""
    import torch

    model.eval()
    n = len(x[names[0]])
    lengths = padding.row_lengths(x) if padding else np.full(n, x[names[0]].shape[1])
    out: list[np.ndarray] = [np.empty(0)] * n
    head = getattr(model, "output_from_hidden", None)
    indices: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    with torch.no_grad():
        for idx, args in _by_length(x, names, padding, batch_size):
            with _autocast(precision):
                states = model.hidden_states(*args)
            states = states.float()
            if head is not None:
                indices.append(idx)
                parts.append(_select(head(states, *args), output_index).detach().float().numpy())
            h = states.float().numpy()
            for j, row in zip(idx, h):
                out[j] = row[: max(1, int(lengths[j]))].astype(np.float16)
    if not parts:
        return out, None
    outputs = np.concatenate(parts)
    result = np.empty_like(outputs)
    result[np.concatenate(indices)] = outputs
    return out, result


def fit(
    model: Any,
    x: dict[str, np.ndarray],
    names: list[str],
    *,
    loss: Loss,
    targets: np.ndarray | None,
    labels: np.ndarray | None,
    val_score: Callable[[Any], float],
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    temperature: float = 4.0,
    alpha: float = 0.5,
    padding: Any = None,
    output_index: int = 0,
    threads: int = 1,
    desc: str = "train",
    progress: bool = True,
    hidden: list[np.ndarray] | None = None,
    hidden_weight: float = 0.0,
    relation_weight: float = 0.0,
    relation_temperature: float = 0.05,
    precision: str = "fp32",
) -> TrainResult:
    """Train ``model`` (Adam, cosine schedule) on named inputs with the given loss; ``val_score``
    reads the model and returns its validation quality (higher is better); the best epoch's
    weights are kept. With ``hidden`` (the teacher's token states per row), the student's
    ``hidden_states`` also learn them, weighted by ``hidden_weight``; a student that also defines
    ``output_from_hidden(states, *inputs)`` then runs once per step, not twice. ``relation_weight``
    adds :func:`relation_loss` (the batch's similarity structure, what retrieval depends on).
    ``precision="bf16"`` runs the model's passes under bfloat16 autocast (weights, optimizer and
    losses stay fp32; validation runs in fp32)."""
    import time

    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    previous_threads = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) < 100_000
    torch.set_num_threads(1 if small else threads)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: the model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    n = len(x[names[0]])
    lengths = padding.row_lengths(x) if padding else np.zeros(n, dtype=np.int64)
    tt = torch.from_numpy(np.ascontiguousarray(targets)).float() if targets is not None else None
    yt = torch.from_numpy(labels) if labels is not None else None
    use_hidden = hidden is not None and hidden_weight > 0
    _autocast(precision)  # a bad value fails here, before the first epoch
    head = getattr(model, "output_from_hidden", None)
    result = TrainResult(model=model)
    best_state = copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    try:
        for epoch in bar:
            model.train()
            total, seen = 0.0, 0
            for idx in _batches(lengths, batch_size, rng):
                feeds = {k: v[idx] for k, v in x.items()}
                if padding:
                    feeds = padding.trim(feeds)
                args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in names)
                states = None
                with _autocast(precision):
                    if use_hidden and head is not None:
                        states = model.hidden_states(*args)
                    else:
                        out = _select(model(*args), output_index)
                        if use_hidden:
                            states = model.hidden_states(*args)
                if states is not None:
                    states = states.float()
                    if head is not None:
                        # One pass: the output is computed (in fp32) from the token states the
                        # hidden term needs.
                        out = _select(head(states, *args), output_index)
                out = out.float()
                it = torch.from_numpy(idx)
                if loss == "ce":
                    value = F.cross_entropy(out, yt[it])  # type: ignore[index]
                elif loss == "kd":
                    assert tt is not None
                    value = temperature**2 * F.kl_div(F.log_softmax(out / temperature, dim=1),
                                                      F.log_softmax(tt[it] / temperature, dim=1),
                                                      reduction="batchmean", log_target=True)
                    if yt is not None and alpha < 1:
                        value = alpha * value + (1 - alpha) * F.cross_entropy(out, yt[it])
                elif loss == "cosine":
                    assert tt is not None
                    target = tt[it]
                    cos = F.cosine_similarity(out.flatten(1), target.flatten(1), dim=1)
                    value = (1 - cos).mean() + F.mse_loss(out, target) * out[0].numel()
                else:
                    assert tt is not None
                    value = F.mse_loss(out, tt[it])
                if use_hidden:
                    assert hidden is not None and states is not None
                    value = value + hidden_weight * _hidden_loss(states, [hidden[j] for j in idx])
                if relation_weight > 0:
                    assert tt is not None, "relation_weight needs the teacher's outputs"
                    value = value + relation_weight * relation_loss(out, tt[it], relation_temperature)
                opt.zero_grad()
                value.backward()
                opt.step()
                total += float(value.detach()) * len(idx)
                seen += len(idx)
            sched.step()
            score = float(val_score(model))
            m = EpochMetrics(epoch + 1, total / max(seen, 1), float("nan"), score)
            result.history.append(m)
            if score > result.best_val_accuracy or epoch == 0:
                result.best_val_accuracy, result.best_epoch = score, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(loss=f"{m.loss:.4f}", val=f"{score:.4f}", refresh=False)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): there, bf16 autocast
    makes a transformer's training steps about 2.5x cheaper; elsewhere it is emulated and slower."""
    import torch

    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if c is not None)


def relation_loss(out: Any, target: Any, temperature: float = 0.05) -> Any:
    """How far the student's in-batch similarity structure is from the teacher's: for each row, the
    KL divergence between softmax(cosine to the other rows / ``temperature``) under the teacher and
    under the student, averaged over rows. Cosine per row does not see which rows are each other's
    nearest neighbours; this term does, and that is what retrieval returns."""
    import torch
    import torch.nn.functional as F

    s = F.normalize(out.flatten(1), dim=1)
    t = F.normalize(target.flatten(1), dim=1)
    # A row is not its own neighbour; a large finite value (not -inf) keeps the KL free of NaN.
    eye = torch.eye(len(s), dtype=torch.bool)
    log_s = F.log_softmax((s @ s.T / temperature).masked_fill(eye, -1e9), dim=1)
    log_t = F.log_softmax((t @ t.T / temperature).masked_fill(eye, -1e9), dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def _hidden_loss(states: Any, targets: list[np.ndarray]) -> Any:
    """Squared error between the student's token states and the teacher's on real tokens, each
    token's error divided by the teacher token's squared norm (so long and short sentences, and
    loud and quiet tokens, weigh alike)."""
    import torch

    length = states.shape[1]
    target = np.zeros((len(targets), length, states.shape[2]), np.float32)
    mask = np.zeros((len(targets), length), np.float32)
    for i, t in enumerate(targets):
        k = min(len(t), length)
        target[i, :k] = t[:k]
        mask[i, :k] = 1.0
    tt, mm = torch.from_numpy(target), torch.from_numpy(mask)
    err = ((states - tt) ** 2).sum(-1) / ((tt**2).sum(-1) + 1e-6)
    return (err * mm).sum() / mm.sum().clamp(min=1.0)


def truncate(teacher: Any, layers: int) -> Any:
    """A copy of ``teacher`` keeping the first ``layers`` blocks of its largest ``nn.ModuleList``
    (a transformer's encoder layers): the usual way to start a student from a pretrained model."""
    import torch

    model = copy.deepcopy(teacher)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("edge.kind 'truncate' needs a teacher with an nn.ModuleList of layers; it has none")
    name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    if layers >= len(blocks):
        raise ValueError(f"edge.layers = {layers} keeps all {len(blocks)} blocks of {name or 'the model'}: "
                         "choose fewer")
    del blocks[layers:]
    for p in model.parameters():
        p.requires_grad_(True)
    return model
