"""Drift detection on digits: shifted inputs cross the threshold within a stated number of
requests, unshifted ones stay below it. Deterministic (seeded streams, every row profiled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support import run_onnx
from tandem.cloud.config import MonitoringConfig
from tandem.cloud.monitor import ModelMonitor
from tandem.shared.bundle import load_bundle
from test_monitor_support import SHIFTS, make_digits_bundle, stream

#: Requests (one row each) after the shift starts by which every shift must have been detected,
#: with the server's defaults (window 1000 rows, threshold 0.25). Measured over 20 seeds
#: (bench/monitor.py --drift-runs 20): brightness 56-64, noise 88-112, a class removed 808-904
#: (its answers' class frequencies only move far enough once most of the window is shifted).
DETECT_WITHIN = {"brightness": 100, "noise": 200, "class_removed": 1000}
#: Unshifted requests served before the shift (the window full of clean traffic).
WARM = 1000
BATCH = 8  # requests per executed batch, as the batcher would group them


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    directory = make_digits_bundle(tmp_path_factory.mktemp("digits") / "digits" / "1", keys[0])
    return load_bundle(directory, keys[1])


def _run(bundle, shift: str | None, seed: int, shifted_rows: int = 1200) -> tuple[float, int | None, ModelMonitor]:  # type: ignore[no-untyped-def]
    """Serve WARM clean requests then ``shifted_rows`` shifted ones through a cloud monitor with
    the server's defaults; returns (highest score while clean, requests after the shift until
    the model was marked drifting or None, the monitor)."""
    monitor = ModelMonitor("digits", "1", bundle, MonitoringConfig(max_cpu_share=1.0))
    clean, _ = stream(None, WARM, seed)
    shifted, _ = stream(shift, shifted_rows, seed + 1000) if shift else stream(None, shifted_rows, seed + 1000)
    x = np.concatenate([clean, shifted])
    logits = run_onnx(bundle.variant_path("cloud"), x)
    clean_max, detected = 0.0, None
    for start in range(0, len(x), BATCH):
        rows = range(start, min(start + BATCH, len(x)))
        monitor.observe([{"input": x[i : i + 1]} for i in rows], [{"logits": logits[i : i + 1]} for i in rows])
        drifting, _ = monitor.rescore()
        score = monitor.report.score if monitor.report else None
        served = rows.stop
        if served <= WARM:
            clean_max = max(clean_max, score or 0.0)
        elif drifting and detected is None:
            detected = served - WARM
    return clean_max, detected, monitor


@pytest.mark.parametrize("shift", SHIFTS)
def test_shift_crosses_the_threshold_within_the_stated_requests(bundle, shift: str) -> None:  # type: ignore[no-untyped-def]
    clean_max, detected, monitor = _run(bundle, shift, seed=1)
    threshold = monitor.config.threshold
    assert clean_max < threshold, f"clean traffic scored {clean_max:.3f} before the shift"
    assert detected is not None and detected <= DETECT_WITHIN[shift], f"{shift}: detected after {detected} requests"
    top = monitor.report.features[0].name  # type: ignore[union-attr]
    if shift == "class_removed":
        assert top == "logits.class"  # the answers' class frequencies moved, not the pixels
    else:
        assert top.startswith("input")


def test_unshifted_stream_stays_below_the_threshold(bundle) -> None:  # type: ignore[no-untyped-def]
    clean_max, detected, monitor = _run(bundle, None, seed=2, shifted_rows=1000)
    assert detected is None and clean_max < monitor.config.threshold
    assert monitor.report is not None and monitor.report.score is not None and monitor.report.score < monitor.config.threshold
    assert monitor.profile.totals == {"rows": 2000, "nonfinite": 0, "out_of_range": 0, "unseen_category": 0, "length_outlier": 0}


def test_input_quality_counts_nan_and_out_of_range_rows(bundle) -> None:  # type: ignore[no-untyped-def]
    monitor = ModelMonitor("digits", "1", bundle, MonitoringConfig(max_cpu_share=1.0))
    x, _ = stream(None, 6, seed=3)
    x[0, 5] = np.nan
    x[1, 7] = np.inf
    x[2, 9] = 1.5  # pixels are in [0, 1] in the reference
    monitor.observe([{"input": x}], [{"logits": run_onnx(bundle.variant_path("cloud"), np.nan_to_num(x))}])
    monitor.flush()  # fewer rows than a profile update takes: profile them now
    assert monitor.profile.totals == {"rows": 6, "nonfinite": 2, "out_of_range": 1, "unseen_category": 0, "length_outlier": 0}
    assert monitor.profile.snapshot()[2] == 4  # rows with NaN/Inf are counted, not profiled
