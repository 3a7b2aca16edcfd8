"""The profile contract (shared/profile.py): features chosen per input kind, fixed bins, scores,
input-quality checks and the bounded window."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.shared.profile import (
    MAX_FEATURES,
    ReferenceProfile,
    RunningProfile,
    feature_plan,
    ks_distance,
    make_reference,
    psi,
)


def _tokens(n: int, rng: np.random.Generator, lo: int = 3, hi: int = 12, vocab: int = 500) -> dict[str, np.ndarray]:
    lengths = rng.integers(lo, hi + 1, n)
    ids = np.zeros((n, 16), np.int64)
    mask = np.zeros((n, 16), np.int64)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(1, vocab, k)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_features_follow_the_input_kind() -> None:
    rng = np.random.default_rng(0)
    plan = feature_plan(
        {"pixels": rng.random((4, 64)), "image": rng.random((4, 3, 32, 32)), **_tokens(4, rng), "category": np.ones((4, 1), np.int64)},
        {"logits": rng.random((4, 10)), "embedding": rng.random((4, 8))},
        pads={"input_ids": 0, "attention_mask": 0}, classifier_outputs={"logits": True},
    )
    names = [p["name"] for p in plan]
    assert names[:64] == [f"pixels[{i}]" for i in range(64)] and names[64:66] == ["pixels.mean", "pixels.std"]
    assert names[66:69] == ["image.mean", "image.std", "image.norm"]  # 3072 elements: summarised
    assert names[69:72] == ["input_ids.length", "input_ids.log_id", "attention_mask.length"]
    assert names[72:] == ["category[0]", "logits.class", "logits.confidence", "embedding.norm"]
    with pytest.raises(ValueError, match=f"at most {MAX_FEATURES}"):
        feature_plan({f"t{i}": rng.random((2, 64)) for i in range(8)})


def test_scores_are_zero_for_the_reference_itself_and_grow_with_a_shift() -> None:
    ref_share = np.array([0.25, 0.25, 0.25, 0.25])
    same = psi(np.array([250, 250, 250, 250]), ref_share, 1000)
    moved = psi(np.array([100, 200, 300, 400]), ref_share, 1000)
    far = psi(np.array([0, 0, 0, 1000]), ref_share, 1000)
    assert same == pytest.approx(0.0, abs=1e-12) and 0.1 < moved < far
    assert ks_distance(np.array([0, 0, 0, 1000]), ref_share) == pytest.approx(0.75)


def test_token_inputs_count_length_outliers_and_a_vocabulary_shift() -> None:
    rng = np.random.default_rng(1)
    ref = make_reference(_tokens(500, rng), pads={"input_ids": 0, "attention_mask": 0})
    r = {t.tensor: t for t in ref.ranges}
    assert (r["input_ids"].min_length, r["input_ids"].max_length) == (3, 12)
    running = RunningProfile(ref, "cloud", window=600, slots=6)
    running.observe(_tokens(300, rng))
    report = running.report(threshold=0.25, min_rows=200)
    assert not report.drifting and running.totals["length_outlier"] == 0
    long_rows = _tokens(300, rng, lo=14, hi=16, vocab=20_000)  # longer rows of rarer (larger) ids
    running.observe(long_rows)
    assert running.totals["length_outlier"] == 300
    top = {f.name: f.psi for f in running.report(threshold=0.25, min_rows=200).features}
    assert top["input_ids.length"] > 0.25 and top["input_ids.log_id"] > 0.25


def test_unseen_categories_and_out_of_range_values() -> None:
    rng = np.random.default_rng(2)
    x = {"kind": rng.integers(0, 3, (300, 1)), "value": rng.random((300, 2)).astype(np.float32)}
    ref = make_reference(x)
    assert {t.tensor: t.categories for t in ref.ranges}["kind"] == [0, 1, 2]
    running = RunningProfile(ref, "cloud", window=100, slots=4)
    kinds = np.array([[0], [7], [2], [1]])  # 7: a category the reference never held (and beyond its range)
    values = np.array([[0.5, 0.5], [0.5, 2.0], [0.5, 0.5], [-1.0, 0.5]], np.float32)
    running.observe({"kind": kinds, "value": values})
    # Rows 1 and 3 are out of range; row 1 counts once although two of its tensors are.
    assert running.totals == {"rows": 4, "nonfinite": 0, "out_of_range": 2, "unseen_category": 1, "length_outlier": 0}


def test_the_window_is_bounded_whatever_the_traffic() -> None:
    rng = np.random.default_rng(3)
    ref = make_reference({"x": rng.random((200, 4))})
    running = RunningProfile(ref, "cloud", window=100, slots=4)
    size = running.nbytes
    for _ in range(200):
        running.observe({"x": rng.random((7, 4))})
    counts, _, rows = running.snapshot()
    # The current slot fills up before the next one is cleared: between window - slot and window.
    assert 75 <= rows <= 100 and running.totals["rows"] == 1400 and running.nbytes == size
    running.observe({"x": rng.random((333, 4))})  # a batch larger than the whole window
    assert 75 <= running.snapshot()[2] <= 100
    assert counts.sum(1).max() == rows  # every feature counted every row of the window


def test_a_profile_round_trips_through_json() -> None:
    rng = np.random.default_rng(4)
    ref = make_reference({"x": rng.random((50, 3))}, {"cloud": {"y": rng.random((50, 4))}}, classifier_outputs={"y": False})
    again = ReferenceProfile.model_validate_json(ref.model_dump_json())
    assert again == ref and [f.name for f in again.features_for("cloud")][-2:] == ["y.class", "y.confidence"]
    assert again.features_for("edge") == again.inputs  # a role without outputs profiles inputs only
