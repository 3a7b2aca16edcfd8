"""One real quick build of examples/digits through `tandem build`, checked end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("torch")

from build_support import DIGITS  # noqa: E402
from tandem.shared.bundle import Bundle, load_bundle  # noqa: E402
from tandem.shared.cli import main  # noqa: E402

pytestmark = pytest.mark.slow


class Built:
    def __init__(self, root: Path, stdout: str, code: int) -> None:
        self.root, self.stdout, self.code = root, stdout, code
        self.repo = root / "artifacts" / "repository"
        self.pub = root / "artifacts" / "keys" / "tandem.pub"

    def bundle(self) -> Bundle:
        return load_bundle(self.repo / "digits" / "1", self.pub)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """`tandem build examples/digits --quick` with the default repository and key paths (so the key is
    generated with a notice), run from a fresh directory."""
    root = tmp_path_factory.mktemp("digits-build")
    cwd = os.getcwd()
    os.chdir(root)
    import contextlib
    import io

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["build", str(DIGITS), "--quick", "--no-progress"])
    finally:
        os.chdir(cwd)
    yield Built(root, out.getvalue(), code)


def test_cli_builds_and_prints_bundle_table_and_report(built: Built) -> None:
    assert built.code == 0, built.stdout
    assert "notice: no signing key" in built.stdout and built.pub.is_file()
    assert f"bundle: {built.repo / 'digits' / '1'}" in built.stdout
    assert "variant" in built.stdout and "cloud-fp32" in built.stdout
    # Which edge variant ships depends on its measured speed (a loaded machine can change it): one does.
    assert re.search(r"^\s+edge-\S+\s+edge\s", built.stdout, re.MULTILINE), built.stdout
    assert f"report: {built.repo / 'digits' / '1.report.md'}" in built.stdout
    assert (built.repo / "digits" / "1.report.md").stat().st_size > 1000
    png = (built.repo / "digits" / "1.report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p.name for p in (built.repo / "digits").iterdir() if p.name.startswith(".")]


def test_manifest_roles_signature_and_metrics(built: Built) -> None:
    m = built.bundle().manifest
    roles = {v.role: v for v in m.variants}
    assert {"cloud", "edge", "cloud-gpu"} <= set(roles)
    assert "cloud-fp32" in {v.name for v in m.variants}
    assert roles["cloud-gpu"].precision == "fp16" and roles["cloud-gpu"].providers[0] == "CUDAExecutionProvider"
    assert [(t.name, t.datatype, t.shape) for t in m.inputs] == [("input", "FP32", ["batch", 64])]
    assert [(t.name, t.datatype, t.shape) for t in m.outputs] == [("logits", "FP32", ["batch", 10])]
    assert m.task.kind == "classification" and m.task.output == "logits" and m.task.labels == [str(i) for i in range(10)]
    for v in m.variants:
        x = v.metrics
        assert x is not None, v.name
        assert 0.85 < (x.accuracy or 0) <= 1.0 and x.n_eval == 360
        assert 0 < x.latency_p50_ms <= x.latency_p99_ms and x.throughput_per_s > 0
        assert x.provider == "CPUExecutionProvider" and x.hardware.cores >= 1 and x.intra_op_threads == 1
        assert "onnxruntime" in x.tool_versions
    fp32 = m.variant("cloud-fp32").metrics
    cloud, edge = roles["cloud"], roles["edge"]
    assert cloud.metrics and edge.metrics and fp32
    if cloud.name != "cloud-fp32":  # an int8 cloud variant is never slower than its fp32 parent
        assert cloud.precision.startswith("int8") and roles["reference"].name == "cloud-fp32"
        assert cloud.metrics.latency_p50_ms < fp32.latency_p50_ms
        assert fp32.accuracy is not None and cloud.metrics.accuracy is not None
        assert fp32.accuracy - cloud.metrics.accuracy <= 0.01
    assert edge.metrics.latency_p50_ms * 10 <= cloud.metrics.latency_p50_ms
    assert edge.size_bytes * 20 <= cloud.size_bytes


def test_dynamic_int8_cnn_is_rejected_as_slower(built: Built) -> None:
    m = built.bundle().manifest
    cands = {c["name"]: c for c in m.provenance.build_config["candidates"]}
    dyn = cands["cloud-int8-dyn"]
    assert dyn["accepted"] is False and dyn["shipped_as"] is None
    assert "slower than fp32" in dyn["reason"]
    assert "cloud-int8-dyn" not in {v.name for v in m.variants}
    assert not (built.repo / "digits" / "1" / "cloud-int8-dyn.onnx").exists()
    report = (built.repo / "digits" / "1.report.md").read_text()
    assert "| cloud-int8-dyn |" in report and "**rejected**: p50 speedup" in report


def test_calibration_is_monotone_and_on_validation(built: Built) -> None:
    m = built.bundle().manifest
    cal = m.calibration
    assert cal is not None and cal.split == "validation" and cal.n == 359
    assert cal.variant == m.variant("edge").name and cal.reference == m.variant("cloud").name
    ts = [p.threshold for p in cal.points]
    keep = [p.keep_share for p in cal.points]
    assert ts == sorted(ts) and keep[0] == 1.0
    assert all(a >= b for a, b in zip(keep, keep[1:]))
    assert all(0 <= p.cascade_accuracy <= 1 for p in cal.points)
    assert cal.threshold_for(0.0) is not None


def test_samples_reproduce_with_onnxruntime(built: Built) -> None:
    b = built.bundle()
    inputs, outputs = b.load_samples()
    assert inputs["input"].shape == (8, 64)
    assert set(outputs) == {v.name for v in b.manifest.variants}
    for v in b.manifest.variants:
        sess = ort.InferenceSession(str(b.path / v.file), providers=["CPUExecutionProvider"])
        got = sess.run(None, inputs)[0]
        np.testing.assert_allclose(got, outputs[v.name]["logits"], atol=b.manifest.samples.atol, rtol=0)  # type: ignore[union-attr]


def test_bundle_verify_command_accepts_the_build(built: Built) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tandem.shared.cli", "bundle", "verify", str(built.repo / "digits" / "1"), "--key", str(built.pub)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK digits:1")
