"""Support for the monitoring tests (no tests here): a digits bundle whose variants are real
classifiers (logistic regressions on scikit-learn's digits, as ONNX Gemm graphs) and whose manifest
carries the reference profile the build would write, plus the shifted input streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from support import run_onnx, save_onnx
from tandem.quantize.calibration import calibrate
from tandem.quantize.profile import reference_profile
from tandem.shared import signing
from tandem.shared.bundle import (
    SAMPLES_NAME,
    Manifest,
    Provenance,
    Samples,
    Task,
    TensorSpec,
    Variant,
    seal_bundle,
    write_samples,
)

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"
SHIFTS = ("brightness", "noise", "class_removed")


def digits() -> dict[str, Any]:
    """examples/digits' split (train/val/test, pixels in [0, 1])."""
    import importlib.util

    # By path under its own name: a plain ``import spec`` would find whichever example's spec.py an
    # earlier test put first on sys.path (the text examples' in a full run).
    module_spec = importlib.util.spec_from_file_location("tandem_monitor_tests_digits_spec", DIGITS / "spec.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.load_data()


def _logistic_onnx(path: Path, x: np.ndarray, y: np.ndarray, c: float) -> Path:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=3000).fit(x, y)
    w = numpy_helper.from_array(clf.coef_.T.astype(np.float32), "w")
    b = numpy_helper.from_array(clf.intercept_.astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w", "b"], ["logits"])], "logistic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w, b],
    )
    return save_onnx(graph, path)


def make_digits_bundle(directory: Path, private_key: Path, name: str = "digits", version: str = "1", profile: bool = True) -> Path:
    data = digits()
    (x_train, y_train), (x_val, y_val) = data["train"], data["val"]
    cloud = _logistic_onnx(directory / "cloud-fp32.onnx", x_train, y_train, 1.0)
    edge = _logistic_onnx(directory / "edge-fp32.onnx", x_train, y_train, 0.01)
    cloud_val, edge_val = run_onnx(cloud, x_val), run_onnx(edge, x_val)
    cal = calibrate(edge_val, cloud_val, y_val, edge_variant="edge-fp32", cloud_variant="cloud-fp32")
    ref = reference_profile({"input": x_val}, {"cloud": {"logits": cloud_val}, "edge": {"logits": edge_val}},
                            task_kind="classification", labels=y_val) if profile else None
    sx = x_val[:4]
    write_samples(directory / SAMPLES_NAME, {"input": sx},
                  {"cloud-fp32": {"logits": run_onnx(cloud, sx)}, "edge-fp32": {"logits": run_onnx(edge, sx)}})
    manifest = Manifest(
        name=name, version=version,
        task=Task(kind="classification", labels=[str(i) for i in range(10)], output="logits"),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=["batch", 64])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=["batch", 10])],
        variants=[
            Variant(name="cloud-fp32", role="cloud", file=cloud.name, sha256="", size_bytes=0, precision="fp32"),
            Variant(name="edge-fp32", role="edge", file=edge.name, sha256="", size_bytes=0, precision="fp32"),
        ],
        calibration=cal, samples=Samples(file=SAMPLES_NAME, sha256="", size_bytes=0, count=len(sx)),
        provenance=Provenance(source="tests/test_monitor_support.py"), profile=ref,
    )
    seal_bundle(directory, manifest, signing.load_private_key(private_key))
    return directory


def stream(shift: str | None, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` test-split digits drawn with replacement (seeded), shifted: ``brightness`` (every
    pixel x -> 0.8 x + 0.1), ``noise`` (Gaussian, sigma 0.05, clipped to [0, 1]) or
    ``class_removed`` (no 0s drawn); None: unshifted. Returns (x float32, labels)."""
    x_test, y_test = digits()["test"]
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(y_test != 0) if shift == "class_removed" else np.arange(len(y_test))
    idx = rng.choice(pool, rows)
    x = x_test[idx].astype(np.float64)
    if shift == "brightness":
        x = x * 0.8 + 0.1
    elif shift == "noise":
        x = np.clip(x + rng.normal(0.0, 0.05, x.shape), 0.0, 1.0)
    elif shift not in (None, "class_removed"):
        raise ValueError(f"unknown shift {shift!r}")
    return x.astype(np.float32), y_test[idx]
