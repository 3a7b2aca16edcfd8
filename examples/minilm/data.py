"""Sentences for the minilm example: real English that ships with Python, tokenized for MiniLM.

The text is the standard library's own documentation: every docstring and comment in its source files
(read with ``ast``, never imported: importing some modules has side effects, e.g. ``antigravity``
opens a browser and ``this`` prints) and the language reference topics in ``pydoc_data.topics``.
It is split into sentences and deduplicated, and the splits are made by *source module*, so a test
sentence comes from a module the student never saw in training (and no sentence is in two splits).

There are no labels: an embedding model is measured against the teacher's embeddings.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import io
import os
import re
import sysconfig
import tokenize as pytokenize
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

MAX_TOKENS = 64
# Fractions of *modules* (not sentences) per split; the rest is train.
VAL_FRACTION = 0.08
TEST_FRACTION = 0.08
# Caps keep the teacher's forward pass over the splits affordable on 2 cores (~20 ms a sentence at
# batch 1 is ~0.3 ms at batch 256) and the retrieval check (test x test similarities) small.
MAX_TRAIN = 40_000
MAX_VAL = 2_000
MAX_TEST = 2_000

# Directories of the stdlib that are tests, demos or bundled third-party code: their docstrings are
# either boilerplate ("Test that ...") or not the stdlib's voice.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
              "turtledemo", "ensurepip", "venv", "config-3"}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[`])")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |#|[-=~^*]{3,}\s*$)")


def _sibling(name: str) -> ModuleType:
    # Loaded by path under a unique name: two examples both have a "models.py", and a plain
    # ``import models`` would return whichever one a process imported first.
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tandem_example_minilm_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sentences(text: str) -> list[str]:
    """Split one docstring into clean prose sentences (code examples and tables dropped)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = para.splitlines()
        # An indented or prompt-led paragraph is an example, a signature or a table, not prose.
        if not lines or any(_CODE_LINE.match(ln) for ln in lines) or lines[0].startswith((" ", "\t")):
            continue
        flat = " ".join(ln.strip() for ln in lines)
        for sent in _SENTENCE_END.split(flat):
            sent = sent.strip()
            words = sent.split()
            if not 5 <= len(words) <= 48 or not sent[0].isalpha():
                continue
            letters = sum(c.isalpha() or c.isspace() for c in sent)
            if letters < 0.85 * len(sent) or any(t in sent for t in ("::", "()(", "{{", "==", "->")):
                continue
            out.append(sent)
    return out


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for d in (ast.get_docstring(n, clean=False) for n in nodes) if d]


def _comments(source: str) -> list[str]:
    """Blocks of consecutive ``#`` comment lines, each joined into one paragraph: the stdlib's comments
    are prose too (why the code does what it does), and there are more of them than docstrings."""
    blocks: list[list[str]] = []
    last = -2
    try:
        for tok in pytokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != pytokenize.COMMENT:
                continue
            text = tok.string.lstrip("#!").strip()
            row = tok.start[0]
            if row == last + 1 and blocks and text:
                blocks[-1].append(text)
            elif text:
                blocks.append([text])
            last = row if text else -2
    except (pytokenize.TokenError, SyntaxError, IndentationError):
        pass
    return ["\n".join(b) for b in blocks]


def _module_name(stdlib: Path, path: Path) -> str:
    rel = path.relative_to(stdlib).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=1)
def _documents() -> tuple[tuple[str, str], ...]:
    """Every (module, docstring or comment block) of the standard library, sorted by module, then
    in source order; the language reference topics follow, one "module" per topic (so a topic's
    text stays in one split)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("test", "config-")))
        files += [Path(root) / n for n in sorted(names) if n.endswith(".py") and not n.startswith("test_")]
    for path in sorted(files):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        module = _module_name(stdlib, path)
        docs += [(module, doc) for doc in _docstrings(source) + _comments(source)]
    topics_path = stdlib / "pydoc_data" / "topics.py"
    if topics_path.exists():
        topics = ast.literal_eval(ast.parse(topics_path.read_text(encoding="utf-8")).body[-1].value)  # type: ignore[attr-defined]
        docs += [(f"pydoc_data.topics.{key}", topics[key]) for key in sorted(topics)]
    return tuple(docs)


@lru_cache(maxsize=1)
def corpus() -> tuple[tuple[str, str], ...]:
    """Every unique (module, sentence) pair, in a fixed order (sorted by module, then source order).

    A sentence that occurs in several modules is kept once, under the first: so it can never sit
    in both the training and the test split."""
    pairs = [(module, s) for module, doc in _documents() for s in _sentences(doc)]
    seen: set[str] = set()
    unique = []
    for module, sent in pairs:
        k = " ".join(sent.lower().split())
        if k not in seen:
            seen.add(k)
            unique.append((module, sent))
    return tuple(unique)


def _bucket(module: str, seed: int) -> float:
    # A stable per-module draw in [0, 1): hashlib, not hash(), which Python salts per process.
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


#: What a quick build (``tandem build --quick``, CI) samples of each split.
QUICK_CAPS = {"train": 1_500, "val": 300, "test": 300}


def split_of(module: str, seed: int = 0) -> str:
    """"train", "val" or "test": the split every sentence of ``module`` belongs to."""
    # Top-level package decides: asyncio.tasks and asyncio.events are in one split.
    r = _bucket(module if module.startswith("pydoc_data") else module.split(".")[0], seed)
    return "test" if r < TEST_FRACTION else "val" if r < TEST_FRACTION + VAL_FRACTION else "train"


def split_sentences(seed: int = 0, quick: bool = False) -> dict[str, list[str]]:
    """The sentences of each split, split by module, deterministic for ``seed``."""
    groups: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for module, sent in corpus():
        groups[split_of(module, seed)].append(sent)
    rng = np.random.default_rng(seed)
    caps = QUICK_CAPS if quick else {"train": MAX_TRAIN, "val": MAX_VAL, "test": MAX_TEST}
    out = {}
    for name, sents in groups.items():
        keep = rng.permutation(len(sents))[: caps[name]]
        out[name] = [sents[i] for i in sorted(keep)]
    return out


def encode(texts: list[str]) -> dict[str, np.ndarray]:
    """Tokenize to int64 [n, L] arrays, padded with 0 to the longest sentence (at most 64 tokens)."""
    tokenize = _sibling("models").tokenize
    enc = tokenize(texts, max_length=MAX_TOKENS)
    return {k: np.ascontiguousarray(v) for k, v in enc.items()}


def _passages(text: str) -> list[list[str]]:
    """A docstring's prose paragraphs, each as its sentences, under looser filters than
    :func:`_sentences` (any length from 3 words, fewer letters): text for the student to learn
    from, never to be measured on."""
    out: list[list[str]] = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = para.splitlines()
        if not lines or any(_CODE_LINE.match(ln) for ln in lines) or lines[0].startswith((" ", "\t")):
            continue
        sents = []
        for sent in _SENTENCE_END.split(" ".join(ln.strip() for ln in lines)):
            sent = sent.strip()
            if len(sent.split()) >= 3 and sum(c.isalpha() or c.isspace() for c in sent) >= 0.75 * len(sent):
                sents.append(sent)
        if sents:
            out.append(sents)
    return out


def _prose(text: str) -> bool:
    # Codec tables and code that slipped through read as noise, not English.
    return (not any(t in text for t in ("::", "()(", "{{", "==", "->", "0x"))
            and sum(c.isalpha() or c.isspace() for c in text) >= 0.8 * len(text))


@lru_cache(maxsize=4)
def extra_sentences(seed: int = 0) -> tuple[str, ...]:
    """More text from the *training* packages only, none of it a sentence of any split: pairs of
    adjacent sentences of a paragraph (up to 48 words), windows of 40 words over longer sentences,
    and the sentences :func:`_sentences` drops as too short or too symbol-laden. The student needs
    no labels (the teacher labels every text), and more distinct text generalises better than
    more passes over the same sentences."""
    seen = {" ".join(s.lower().split()) for _, s in corpus()}
    out: list[str] = []

    def add(text: str) -> None:
        key = " ".join(text.lower().split())
        if key not in seen and _prose(text):
            seen.add(key)
            out.append(text)

    for module, doc in _documents():
        if split_of(module, seed) != "train":
            continue
        for sents in _passages(doc):
            for sent in sents:
                words = sent.split()
                if len(words) > 48:
                    for i in range(0, len(words), 32):
                        if len(words[i : i + 40]) >= 5:
                            add(" ".join(words[i : i + 40]))
                else:
                    add(sent)
            for a, b in zip(sents, sents[1:]):
                if len(a.split()) + len(b.split()) <= 48:
                    add(f"{a} {b}")
    return tuple(out)


#: How much of :func:`extra_sentences` a quick build uses (a full build uses all of it).
QUICK_EXTRA = 300


def load_data(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """``{"train"|"val"|"test"|"unlabelled": {"input_ids": int64 [n, L], "attention_mask": int64 [n, L]}}``.
    The sentences of train/val/test are :func:`split_sentences` (same seed, same order); the
    unlabelled text is :func:`extra_sentences` (training packages only)."""
    out: dict[str, Any] = {name: encode(s) for name, s in split_sentences(seed, quick).items()}
    extra = list(extra_sentences(seed))
    if quick:
        extra = extra[:QUICK_EXTRA]
    if extra:
        out["unlabelled"] = encode(extra)
    return out
