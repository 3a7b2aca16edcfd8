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
