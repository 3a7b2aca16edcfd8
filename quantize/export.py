"""torch -> ONNX with a dynamic batch dimension, checked against torch on real inputs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportMismatch

log = logging.getLogger(__name__)

OPSET = 18


def export_onnx(
    model: Any,
    example: np.ndarray,
    path: str | Path,
    *,
    input_name: str = "input",
    output_name: str = "logits",
) -> Path:
    """Export ``model`` (eval mode) to one self-contained ``.onnx`` file with batch as a dynamic dim."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:2]))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # The exporter warns about torchvision ops on every call; they are irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (x,),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    # Weights inline (one file per variant: the manifest hashes files one by one).
    program.save(str(path), external_data=False)
    return path


def verify_export(
    model: Any,
    path: str | Path,
    inputs: np.ndarray,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    batch_sizes: tuple[int, ...] = (1, 7),
) -> float:
    """Run torch and ONNX Runtime on the same real inputs at several batch sizes; raise
    :class:`ExportMismatch` naming the largest difference if they disagree. Returns the max abs diff."""
    import onnxruntime as ort
    import torch

    model.eval()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst = 0.0
    chunks = [inputs[:b] for b in batch_sizes if b <= len(inputs)] + [inputs]
    for chunk in chunks:
        with torch.no_grad():
            expected = model(torch.from_numpy(np.ascontiguousarray(chunk))).numpy()
        try:
            got = sess.run(None, {name: chunk})[0]
        except Exception as e:
            raise ExportMismatch(f"{Path(path).name}: ONNX Runtime cannot run the export at batch {len(chunk)}: {e}") from None
        if got.shape != expected.shape:
            raise ExportMismatch(
                f"{Path(path).name}: ONNX output shape {got.shape} != torch {expected.shape} at batch {len(chunk)}"
            )
        diff = np.abs(got - expected)
        worst = max(worst, float(diff.max()))
        if not np.allclose(got, expected, rtol=rtol, atol=atol):
            i = np.unravel_index(int(diff.argmax()), diff.shape)
            raise ExportMismatch(
                f"{Path(path).name}: ONNX Runtime output differs from torch by {float(diff.max()):.3g} "
                f"at {tuple(int(j) for j in i)} (batch {len(chunk)}; tolerance rtol={rtol}, atol={atol}): "
                "the model does something the exporter did not capture"
            )
    log.info("export %s matches torch (max abs diff %.2e)", Path(path).name, worst)
    return worst
