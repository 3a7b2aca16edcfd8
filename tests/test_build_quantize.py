"""Quantization passes on real ONNX graphs (no torch): the search copes with failures and says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from support import make_mlp_onnx
from tandem.quantize.quantize import make_candidates, preprocess
from tandem.quantize.spec import default_search


def test_every_default_config_quantizes_a_real_mlp(tmp_path: Path) -> None:
    fp32 = make_mlp_onnx(tmp_path / "m.onnx", hidden=(64,))
    calib = np.random.default_rng(0).random((32, 64), dtype=np.float32)
    cands = make_candidates(fp32, "cloud-fp32", default_search(), "input", calib, tmp_path / "out")
    assert [c.name for c in cands] == [f"cloud-{c.name}" for c in default_search()]
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": calib})[0]
    for c in cands:
        assert not c.reason, c.reason
        assert c.size_bytes == c.path.stat().st_size < fp32.stat().st_size
        got = ort.InferenceSession(str(c.path), providers=["CPUExecutionProvider"]).run(None, {"input": calib})[0]
        assert (got.argmax(1) == ref.argmax(1)).mean() > 0.8, c.name


def test_preprocess_failure_falls_back_and_quantizer_failure_is_a_recorded_rejection(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    used, note = preprocess(broken, tmp_path / "pre.onnx")
    assert used == broken and note is not None and "quant_pre_process failed" in note
    cands = make_candidates(broken, "cloud-fp32", default_search()[:2], "input",
                            np.zeros((4, 64), np.float32), tmp_path / "out")
    for c in cands:
        assert c.reason.startswith("quantization failed:") and not c.accepted
        assert any("quantized the graph as exported" in n for n in c.notes)
