"""Tiny build specs for pipeline tests: real torch models and real data (the digits split), small
enough that a whole build takes seconds."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"

TINY_MODELS = '''
from __future__ import annotations
import torch
from torch import nn


def teacher() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def student() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def broken() -> nn.Module:
    raise RuntimeError("no weights here")


def not_a_module():
    return "a string"
'''


def write_tiny_spec(directory: Path, **overrides: str) -> Path:
    """A TOML spec (tiny MLP teacher/student, digits data) in ``directory``; ``overrides`` replace
    top-level TOML lines by key (value given as TOML text)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tiny_models.py").write_text(TINY_MODELS)
    top = {
        "name": '"tiny"',
        "teacher": '"tiny_models.py:teacher"',
        "student": '"tiny_models.py:student"',
        "load_data": f'"{DIGITS / "spec.py"}:load_data"',
    }
    top.update(overrides)
    lines = [f"{k} = {v}" for k, v in top.items()]
    lines += [
        "",
        "[training]",
        "teacher_epochs = 2",
        "student_epochs = 10",
        "",
        "[evaluation]",
        "latency_runs = 50",
        "warmup_runs = 5",
        "throughput_runs = 5",
        "",
        "[[search]]",
        'name = "int8-dyn-mm"',
        'format = "dynamic"',
        'op_types = ["MatMul", "Gemm"]',
    ]
    path = directory / "spec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


TOKENS_MODELS = '''
from __future__ import annotations
import torch
from torch import nn


class Encoder(nn.Module):
    """Token ids + attention mask -> one vector per row: embed, mix, masked mean, project."""

    def __init__(self, vocab: int = 500, width: int = 32, out: int = 16, seed: int = 0, normalize: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab, width)
        self.mix = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, out)
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.embedding(input_ids))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        out = self.head(pooled)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


def teacher() -> nn.Module:
    return Encoder(width=96, seed=1)


def student() -> nn.Module:
    return Encoder(width=16, seed=2)


def wide_teacher() -> nn.Module:
    # Wide enough that int8 matrix products beat fp32 ones (on a tiny model int8 loses to overhead).
    return Encoder(width=768, seed=1)


def classifier_teacher() -> nn.Module:
    return Encoder(width=64, out=3, seed=1, normalize=False)


def classifier_student() -> nn.Module:
    return Encoder(width=8, out=3, seed=2, normalize=False)


class FixedLength(nn.Module):
    """Reshapes to a fixed number of tokens: cannot take another sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(500, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids).reshape(input_ids.shape[0], 20 * 4)[:, :16]


def fixed_length() -> nn.Module:
    return FixedLength()


def regression_teacher() -> nn.Module:
    return Encoder(width=64, out=4, seed=1, normalize=False)


def regression_student() -> nn.Module:
    return Encoder(width=16, out=4, seed=2, normalize=False)


def close_enough(outputs, reference, labels):  # type: ignore[no-untyped-def]
    """A user's own metric: 1 - mean absolute error per row, floored at 0."""
    import numpy as np

    return np.clip(1.0 - np.abs(outputs - reference).reshape(len(outputs), -1).mean(1), 0.0, 1.0)
'''

TOKENS_DATA = '''
from __future__ import annotations
import numpy as np


def tokens(n: int, rng: np.random.Generator, vocab: int = 500, max_len: int = 20) -> dict[str, np.ndarray]:
    lengths = rng.integers(3, max_len + 1, size=n)
    ids = np.zeros((n, max_len), dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(1, vocab, size=k)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"train": tokens(1200, rng), "val": tokens(300, rng), "test": tokens(300, rng)}


def with_unlabelled(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = load_data(seed)
    out["unlabelled"] = tokens(500, rng, max_len=25)  # longer rows than the splits: padded to match
    return out


def labelled(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 1200), ("val", 300), ("test", 300)):
        x = tokens(n, rng)
        # Three classes by which third of the vocabulary most tokens come from: learnable from the ids.
        y = np.array([np.bincount((ids[ids > 0] * 3) // 500, minlength=3).argmax() for ids in x["input_ids"]])
        out[split] = (x, y.astype(np.int64))
    out["labels"] = ["low", "mid", "high"]
    return out
'''

TOKENS_SPEC = '''
from models import {teacher}, {student}, close_enough
from data import {data}

SPEC = {{
    "name": "tokens",
    "task": {task},
    "inputs": [
        {{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"], "pad": 0}},
        {{"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"], "pad": 0}},
    ],
    "outputs": [{{"name": "{output}"}}],
    "teacher": {teacher},
    "student": {student},
    "load_data": {data},
    "training": {{"teacher_epochs": 3, "student_epochs": 8, "batch_size": 64, "student_lr": 0.01, "teacher_lr": 0.01}},
    "evaluation": {{"latency_runs": 40, "warmup_runs": 5, "throughput_runs": 5, "calibration_samples": 32}},
    "search": [{{"name": "int8-dyn-mm", "format": "dynamic", "op_types": ["MatMul", "Gemm"]}}],
    "budgets": {{"edge_min_relative_accuracy": 0.5, "max_accuracy_drop": 0.05, "min_speedup": 1.0, "edge_min_speedup": 0.0}},
    **{extra},
}}
'''


def write_tokens_spec(directory: Path, *, task: str = '{"kind": "embedding", "tolerance": 0.9}',
                      teacher: str = "teacher", student: str = "student", data: str = "load_data",
                      output: str = "embedding", extra: str = "{}") -> Path:
    """A ``spec.py`` beside its own ``models.py`` and ``data.py`` (imported as sibling modules): a
    two-input int64 model with dynamic batch and sequence axes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "models.py").write_text(TOKENS_MODELS)
    (directory / "data.py").write_text(TOKENS_DATA)
    spec = directory / "spec.py"
    spec.write_text(TOKENS_SPEC.format(task=task, teacher=teacher, student=student, data=data, output=output, extra=extra))
    return directory
