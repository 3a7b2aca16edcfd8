"""Sentences for the textclass example, labelled by which area of the standard library they document.

The text is the minilm example's corpus (the stdlib's docstrings and comments, read with ``ast`` and
``tokenize``, never imported), kept where the source module belongs to one of five areas below. The
label is a property of the source, not of a person's judgement, and it is learnable from the words
("socket", "thread", "directory", "pattern", "assert"...) without being a keyword lookup: many
sentences in each area are about arguments, errors or return values in general.

Splits are by source module (a test sentence comes from a module no training sentence came from),
deterministic for a seed, and capped per class so the classes are balanced and the frozen
teacher's forward passes stay cheap on 2 cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# Top-level stdlib module -> area. A module not listed is not used.
AREAS: dict[str, tuple[str, ...]] = {
    "files": ("os", "posixpath", "ntpath", "genericpath", "pathlib", "shutil", "glob", "fnmatch", "tempfile",
              "filecmp", "fileinput", "stat", "zipfile", "tarfile", "gzip", "bz2", "lzma", "zipimport",
              "shelve", "dbm", "io", "_pyio", "mmap", "netrc", "mailcap"),
    "network": ("socket", "socketserver", "ssl", "http", "urllib", "email", "smtplib", "ftplib", "imaplib",
                "poplib", "nntplib", "xmlrpc", "ipaddress", "mailbox", "wsgiref", "mimetypes", "smtpd",
                "telnetlib", "webbrowser", "uuid"),
    "concurrency": ("threading", "_threading_local", "multiprocessing", "concurrent", "asyncio", "queue",
                    "sched", "subprocess", "selectors", "signal", "asyncore", "asynchat", "_weakrefset"),
    "text": ("re", "sre_compile", "sre_parse", "sre_constants", "string", "textwrap", "difflib", "codecs",
             "encodings", "csv", "json", "html", "gettext", "locale", "stringprep", "shlex", "unicodedata",
             "_markupbase", "quopri", "base64", "binascii"),
    "testing": ("unittest", "doctest", "pdb", "bdb", "trace", "traceback", "cProfile", "profile", "pstats",
                "timeit", "tracemalloc", "faulthandler", "tabnanny", "pyclbr"),
}
LABELS = list(AREAS)
MAX_PER_CLASS = {"train": 400, "val": 60, "test": 120}
#: A quick build (``tandem build --quick``, CI) samples fewer.
QUICK_PER_CLASS = {"train": 80, "val": 30, "test": 40}
SPLIT = (0.7, 0.15)  # train, val fractions of the modules; the rest is test


def _minilm(name: str) -> ModuleType:
    # The encoder, tokenizer and corpus are the minilm example's, loaded by path under a unique
    # name (both examples have a models.py and a data.py; ``import models`` would be ambiguous).
    key = f"tandem_example_minilm_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "minilm" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_AREA_OF = {mod: i for i, mods in enumerate(AREAS.values()) for mod in mods}


def _draw(module: str, seed: int) -> float:
    digest = hashlib.sha256(f"textclass:{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def split_sentences(seed: int = 0, quick: bool = False) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{split: (sentences, labels)}``, split by (full dotted) module name, balanced by capping."""
    per: dict[str, list[list[str]]] = {s: [[] for _ in LABELS] for s in ("train", "val", "test")}
    for module, sent in _minilm("data").corpus():
        area = _AREA_OF.get(module.split(".")[0])
        if area is None:
            continue
        r = _draw(module, seed)
        split = "train" if r < SPLIT[0] else "val" if r < SPLIT[0] + SPLIT[1] else "test"
        per[split][area].append(sent)
    rng = np.random.default_rng(seed)
    out = {}
    for split, classes in per.items():
        texts: list[str] = []
        labels: list[int] = []
        for label, sents in enumerate(classes):
            keep = sorted(rng.permutation(len(sents))[: (QUICK_PER_CLASS if quick else MAX_PER_CLASS)[split]])
            texts += [sents[i] for i in keep]
            labels += [label] * len(keep)
        order = rng.permutation(len(texts))
        out[split] = ([texts[i] for i in order], np.asarray(labels, dtype=np.int64)[order])
    return out


def load_data(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """``{"train"|"val"|"test": ({"input_ids", "attention_mask"}: int64 [n, L] padded with 0, labels
    int64 [n]), "labels": [area names]}``."""
    tokenize = _minilm("models").tokenize
    out: dict[str, Any] = {split: (tokenize(texts), labels) for split, (texts, labels) in split_sentences(seed, quick).items()}
    out["labels"] = LABELS
    return out
