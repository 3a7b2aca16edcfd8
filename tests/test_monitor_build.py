"""The build writes a reference profile into the signed manifest, and bundles without one still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tandem.shared import signing
from tandem.shared.bundle import MANIFEST_NAME, load_bundle, seal_bundle
from tandem.shared.errors import SignatureError
from tandem.shared.profile import RunningProfile


def test_bundle_without_profile_keeps_its_manifest_bytes_and_loads(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    raw = (toy_bundle / MANIFEST_NAME).read_bytes()
    assert b'"profile"' not in raw  # omitted, not null: readers from before the field accept it
    bundle = load_bundle(toy_bundle, keys[1])
    assert bundle.manifest.profile is None


def test_profile_is_signed_with_the_manifest(toy_bundle: Path, keys: tuple[Path, Path]) -> None:
    from tandem.shared.profile import make_reference

    bundle = load_bundle(toy_bundle, keys[1])
    x = np.random.default_rng(0).random((200, 64)).astype(np.float32)
    m = bundle.manifest.model_copy(deep=True)
    m.profile = make_reference({"input": x})
    seal_bundle(toy_bundle, m, signing.load_private_key(keys[0]))
    assert load_bundle(toy_bundle, keys[1]).manifest.profile == m.profile
    doc = json.loads((toy_bundle / MANIFEST_NAME).read_bytes())
    doc["profile"]["n"] = 1  # a tampered reference must not verify
    (toy_bundle / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    with pytest.raises(SignatureError):
        load_bundle(toy_bundle, keys[1])


def test_tiny_build_writes_a_reference_profile(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pytest.importorskip("torch")
    from build_support import write_tiny_spec
    from tandem.quantize.pipeline import build
    from tandem.quantize.spec import load_spec

    spec = load_spec(write_tiny_spec(tmp_path / "spec"))
    result = build(spec, tmp_path / "repo", signing.load_private_key(keys[0]), progress=False, echo=lambda _: None, quick=True)
    profile = load_bundle(result.bundle_path, keys[1]).manifest.profile
    assert profile is not None and profile.split == "validation" and profile.n == 359
    names = [f.name for f in profile.inputs]
    assert names[:2] == ["input[0]", "input[1]"] and "input.mean" in names and "input.std" in names
    for role in ("cloud", "edge"):
        assert [f.name for f in profile.outputs[role]] == ["logits.class", "logits.confidence"]
        assert all(abs(sum(f.reference) - 1.0) < 1e-9 for f in profile.outputs[role])
    v = profile.validation
    assert v is not None and v.n == 359 and v.agreement is not None and 0.5 < v.agreement <= 1.0
    assert v.edge_accuracy is not None and v.cloud_accuracy is not None
    # A running profile of the validation split's own pixels scores near zero against it.
    from support import run_onnx
    from test_monitor_support import digits

    x_val = digits()["val"][0]  # the 359 validation rows the build profiled
    bundle = load_bundle(result.bundle_path, keys[1])
    running = RunningProfile(profile, "cloud", window=400)
    running.observe({"input": x_val}, {"logits": run_onnx(bundle.variant_path("cloud"), x_val)})
    report = running.report(threshold=0.25, min_rows=100)
    assert report.rows == 359 and report.score is not None and report.score < 0.05 and not report.drifting
    with pytest.raises(ValueError, match="no output 'logits'"):
        running.observe({"input": x_val})
