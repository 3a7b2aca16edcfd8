"""The textclass models: which area of the standard library a sentence documents (see data.py).

Both take ``input_ids`` and ``attention_mask`` (int64 [batch, sequence], padded with 0) and return
logits [batch, len(LABELS)].

* teacher: the real all-MiniLM-L6-v2 encoder, frozen, its normalised mean-pooled sentence embedding,
  and a linear head: only the head (384 x K) is trained, so the teacher costs forward passes only.
* student: the minilm example's small encoder (frozen SVD-factorised token table, narrow layers)
  with its output projection as the classifier, distilled from the teacher's soft targets.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn


def _sibling(example: str, name: str) -> ModuleType:
    # By path under a unique name: both examples have a models.py and a data.py.
    key = f"tandem_example_{example}_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parent.parent / example / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _minilm() -> ModuleType:
    return _sibling("minilm", "models")


LABELS: list[str] = _sibling("textclass", "data").LABELS


def tokenize(texts: list[str], max_length: int = 64) -> dict[str, np.ndarray]:
    """The MiniLM WordPiece tokenizer (from the installed model package), padded with 0."""
    return _minilm().tokenize(texts, max_length=max_length)


class FrozenMiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 sentence embedding (frozen) -> linear head."""

    def __init__(self, n_classes: int = len(LABELS)) -> None:
        super().__init__()
        self.encoder = _minilm().load_minilm()
        self.encoder.requires_grad_(False)
        self.head = nn.Linear(self.encoder.layers[0].query.in_features, n_classes)
        # The embedding is L2-normalised (entries ~0.05): a scale lets the head's default init and
        # learning rate produce logits of a useful size without a hand-tuned lr.
        self.scale = 10.0

    def train(self, mode: bool = True) -> FrozenMiniLMClassifier:
        super().train(mode)
        self.encoder.eval()  # frozen means its eval behaviour too, whatever the trainer sets
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask) * self.scale)


def teacher() -> nn.Module:
    return FrozenMiniLMClassifier()


def student() -> nn.Module:
    """A 2-layer, 128-wide encoder with a rank-64 token table: ~2.1M parameters, ~2M of them the
    frozen table (int8 with a quantized Gather: ~2 MB)."""
    m = _minilm()
    return m.init_from_teacher(m.StudentEncoder(rank=64, hidden=128, layers=2, heads=4, ffn=256,
                                                out=len(LABELS), normalize=False))
