"""torch -> ONNX export: one self-contained file, dynamic batch, and mismatches caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from tandem.quantize.errors import ExportMismatch  # noqa: E402
from tandem.quantize.export import export_onnx, verify_export  # noqa: E402


def _x(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).random((n, 64), dtype=np.float32)


def test_export_is_one_file_with_a_dynamic_batch_that_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    path = export_onnx(model, _x(), tmp_path / "m.onnx", input_name="input", output_name="logits")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # weights inline, no .onnx.data
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # symbolic batch
    assert verify_export(model, path, _x()) < 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3, 33):
        assert sess.run(None, {"input": _x(n)})[0].shape == (n, 10)


class _CountsCalls(torch.nn.Module):
    """Adds how often it has been called: the exporter bakes in one count, torch keeps counting."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) + self.calls


def test_export_that_does_not_capture_the_model_is_refused(tmp_path: Path) -> None:
    model = _CountsCalls()
    path = export_onnx(model, _x(), tmp_path / "c.onnx")
    with pytest.raises(ExportMismatch, match=r"c.onnx: ONNX Runtime output differs from torch by .* tolerance"):
        verify_export(model, path, _x())


def test_export_of_another_model_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    path = export_onnx(model, _x(), tmp_path / "m.onnx")
    with torch.no_grad():
        model.weight[0, 0] += 0.5  # the graph no longer is this model
    with pytest.raises(ExportMismatch, match="differs from torch"):
        verify_export(model, path, _x())


def test_wrong_output_shape_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 10)
    path = export_onnx(model, _x(), tmp_path / "m.onnx")
    with pytest.raises(ExportMismatch, match=r"output shape \(1, 10\) != torch \(1, 5\)"):
        verify_export(torch.nn.Linear(64, 5), path, _x())
