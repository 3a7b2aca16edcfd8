"""The pipeline on a tiny spec (seconds): refusals leave nothing behind, versions never collide."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from build_support import write_tiny_spec  # noqa: E402
from tandem.quantize.errors import BudgetError, BuildError, SpecError  # noqa: E402
from tandem.quantize.pipeline import build, next_version  # noqa: E402
from tandem.quantize.spec import load_spec  # noqa: E402
from tandem.shared import signing  # noqa: E402
from tandem.shared.bundle import load_bundle  # noqa: E402


def _build(tmp_path: Path, keys: tuple[Path, Path], **kw: object):  # type: ignore[no-untyped-def]
    spec = load_spec(write_tiny_spec(tmp_path / "spec", **kw.pop("overrides", {})))  # type: ignore[arg-type]
    return build(spec, tmp_path / "repo", signing.load_private_key(keys[0]), progress=False, echo=lambda _: None,
                 **kw)  # type: ignore[arg-type]


def _leftovers(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) if repo.exists() else []


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("broken", r"the teacher factory in .* failed: RuntimeError: no weights here"),
        ("not_a_module", r"the teacher factory in .* returned str, not a torch.nn.Module"),
    ],
)
def test_failing_factory_is_a_spec_error(tmp_path: Path, keys: tuple[Path, Path], factory: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _build(tmp_path, keys, overrides={"teacher": f'"tiny_models.py:{factory}"'})
    assert _leftovers(tmp_path / "repo") == ["tiny"]


def test_impossible_edge_budget_refuses_the_build_and_says_why(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    spec_path = write_tiny_spec(tmp_path / "spec")
    spec_path.write_text(spec_path.read_text() + "\n[budgets]\nedge_min_size_ratio = 100000.0\n")
    spec = load_spec(spec_path)
    with pytest.raises(BudgetError, match=r"no edge variant meets the budgets .* edge size ratio [0-9.]+ < required 100000"):
        build(spec, tmp_path / "repo", signing.load_private_key(keys[0]), progress=False, echo=lambda _: None)
    assert _leftovers(tmp_path / "repo") == ["tiny"]  # no bundle, no half-built directory


def test_tiny_build_with_no_fast_enough_int8_ships_fp32_then_versions(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    spec_path = write_tiny_spec(tmp_path / "spec")
    spec_path.write_text(spec_path.read_text() + "\n[budgets]\nmin_speedup = 1000.0\n")
    result = build(load_spec(spec_path), tmp_path / "repo", signing.load_private_key(keys[0]), progress=False,
                   echo=lambda _: None)
    assert result.bundle_path == tmp_path / "repo" / "tiny" / "1"
    bundle = load_bundle(result.bundle_path, keys[1])
    m = bundle.manifest
    assert sorted(v.role for v in m.variants) == ["cloud", "cloud-gpu", "edge"]
    assert m.variant("cloud").name == "cloud-fp32" and m.variant("edge").name == "edge-fp32"
    assert len({v.name for v in m.variants}) == len(m.variants) == 3
    for c in m.provenance.build_config["candidates"]:
        assert c["accepted"] is False and "< required 1000.00x" in c["reason"], c
    assert result.report_md.is_file() and result.report_png.stat().st_size > 1000
    assert next_version(tmp_path / "repo" / "tiny") == "2"
    spec = load_spec(tmp_path / "spec" / "spec.toml")
    with pytest.raises(BuildError, match=r"tiny/1 already exists"):
        build(spec, tmp_path / "repo", signing.load_private_key(keys[0]), version="1", progress=False,
              echo=lambda _: None)


def test_bad_version_is_refused_before_any_work(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(BuildError, match=r"version '../escape' must match"):
        _build(tmp_path, keys, version="../escape")
    assert _leftovers(tmp_path / "repo") == []


def test_next_version_ignores_non_integers(tmp_path: Path) -> None:
    assert next_version(tmp_path / "none") == "1"
    for name in ("1", "9", "10", "1.5", "beta"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a bundle")
    assert next_version(tmp_path) == "11"


def test_best_prefers_accuracy_among_candidates_equally_fast() -> None:
    from tandem.quantize.evaluate import hardware_info
    from tandem.quantize.quantize import Candidate, best
    from tandem.shared.bundle import VariantMetrics

    hw = hardware_info()

    def cand(name: str, p50: float, acc: float, accepted: bool = True) -> Candidate:
        m = VariantMetrics(accuracy=acc, n_eval=100, latency_p50_ms=p50, latency_p99_ms=p50 * 2, throughput_per_s=1.0,
                           throughput_batch_size=8, intra_op_threads=1, provider="CPUExecutionProvider", hardware=hw)
        return Candidate(name, None, Path(name), "p", "int8-qdq", metrics=m, accepted=accepted)

    fast_less_accurate, nearly_as_fast_more_accurate = cand("a", 0.146, 0.9889), cand("b", 0.151, 0.9917)
    slow_most_accurate, rejected = cand("c", 0.362, 0.9944), cand("d", 0.01, 1.0, accepted=False)
    assert best([fast_less_accurate, nearly_as_fast_more_accurate, slow_most_accurate, rejected]).name == "b"  # type: ignore[union-attr]
    assert best([rejected]) is None


def test_best_prefers_the_smaller_of_equally_good_and_fast_candidates() -> None:
    from tandem.quantize.evaluate import hardware_info
    from tandem.quantize.quantize import Candidate, best
    from tandem.shared.bundle import VariantMetrics

    hw = hardware_info()

    def cand(name: str, p50: float, q: float, size: int) -> Candidate:
        m = VariantMetrics(quality=q, n_eval=100, latency_p50_ms=p50, latency_p99_ms=p50 * 2, throughput_per_s=1.0,
                           throughput_batch_size=8, intra_op_threads=1, provider="CPUExecutionProvider", hardware=hw)
        return Candidate(name, None, Path(name), "p", "int8-dynamic", metrics=m, accepted=True, size_bytes=size)

    big, small = cand("big", 1.00, 0.9921, 51_600_000), cand("small", 1.02, 0.9915, 15_800_000)
    assert best([big, small]).name == "small"  # type: ignore[union-attr]
    # A real quality difference still wins over size.
    assert best([big, cand("small-worse", 1.0, 0.95, 15_800_000)]).name == "big"  # type: ignore[union-attr]
