"""The device store: verified install, probation, atomic activation, rollback, pruning, recovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent_support import publish, reseal_with_wrong_samples, tamper_edge_file
from tandem.edge.agent.store import ModelStore, ProbationFailed
from tandem.shared import signing
from tandem.shared.errors import HashMismatch, UntrustedSignature


def stage(store: ModelStore, src: Path, version: str) -> Path:
    """What a finished download looks like: the bundle's edge files in tmp/ (no cloud variant)."""
    dst = store.staging_dir("toy", version)
    shutil.copytree(src, dst)
    (dst / "cloud-fp32.onnx").unlink()
    return dst


@pytest.fixture
def store(tmp_path: Path, keys: tuple[Path, Path]) -> ModelStore:
    return ModelStore(tmp_path / "data", [signing.load_public_key(keys[1])], keep_versions=2)


def test_install_activates_and_prunes_to_keep_versions(store: ModelStore, tmp_path: Path, keys) -> None:
    for v in ("1", "2", "3"):
        publish(tmp_path / "repo", keys[0], v)
        act = store.install(stage(store, tmp_path / "repo" / "toy" / v, v), "toy", v)
        assert act.version == v and store.active_version("toy") == v
    assert store.installed("toy") == ["2", "3"]
    assert store.history("toy") == ["2", "3"]
    assert not store.staging_dir("toy", "3").exists()
    assert store.load("toy", "3").version == "3"


def test_probation_failure_keeps_the_previous_version(store: ModelStore, tmp_path: Path, keys) -> None:
    publish(tmp_path / "repo", keys[0], "1")
    store.install(stage(store, tmp_path / "repo/toy/1", "1"), "toy", "1")
    bad = publish(tmp_path / "repo", keys[0], "2")
    reseal_with_wrong_samples(bad, keys[0])
    with pytest.raises(ProbationFailed, match="differs from the recorded one"):
        store.install(stage(store, bad, "2"), "toy", "2")
    assert store.active_version("toy") == "1"
    assert store.installed("toy") == ["1"]


def test_tampered_and_foreign_signed_bundles_are_refused(store: ModelStore, tmp_path: Path, keys) -> None:
    publish(tmp_path / "repo", keys[0], "1")
    store.install(stage(store, tmp_path / "repo/toy/1", "1"), "toy", "1")
    tampered = publish(tmp_path / "repo", keys[0], "2")
    tamper_edge_file(tampered)
    with pytest.raises(HashMismatch):
        store.install(stage(store, tampered, "2"), "toy", "2")
    other_priv, _ = signing.generate_keypair(tmp_path / "other")
    foreign = publish(tmp_path / "repo2", other_priv, "3")
    with pytest.raises(UntrustedSignature):
        store.install(stage(store, foreign, "3"), "toy", "3")
    assert store.active_version("toy") == "1"


def test_recover_finishes_an_interrupted_activation(store: ModelStore, tmp_path: Path, keys) -> None:
    publish(tmp_path / "repo", keys[0], "1")
    store.install(stage(store, tmp_path / "repo/toy/1", "1"), "toy", "1")
    # Crash after the move into models/ but before the pointer changed.
    publish(tmp_path / "repo", keys[0], "2")
    shutil.move(stage(store, tmp_path / "repo/toy/2", "2"), store.model_dir("toy") / "2")
    assert store.active_version("toy") == "1"
    assert store.recover() == {"toy": "2"}
    assert store.history("toy") == ["1", "2"]


def test_recover_rolls_back_when_the_active_version_is_damaged(store: ModelStore, tmp_path: Path, keys) -> None:
    for v in ("1", "2"):
        publish(tmp_path / "repo", keys[0], v)
        store.install(stage(store, tmp_path / f"repo/toy/{v}", v), "toy", v)
    tamper_edge_file(store.model_dir("toy") / "2")
    (store.model_dir("toy") / ".active.json.tmp").write_text("{half")  # a crash mid-write
    assert store.recover() == {"toy": "1"}
    assert json.loads((store.model_dir("toy") / "active.json").read_text())["rolled_back_from"] == "2"
    assert not (store.model_dir("toy") / ".active.json.tmp").exists()
    assert store.installed("toy") == ["1"]


def test_recover_removes_an_orphan_that_fails_verification(store: ModelStore, tmp_path: Path, keys) -> None:
    publish(tmp_path / "repo", keys[0], "1")
    store.install(stage(store, tmp_path / "repo/toy/1", "1"), "toy", "1")
    publish(tmp_path / "repo", keys[0], "2")
    orphan = store.model_dir("toy") / "2"
    shutil.move(stage(store, tmp_path / "repo/toy/2", "2"), orphan)
    tamper_edge_file(orphan)
    assert store.recover() == {"toy": "1"}
    assert not orphan.exists()
    assert store.state("toy")["last_attempt"]["outcome"] == "refused"


def test_status_reads_the_data_dir_and_notices_a_dead_agent(store: ModelStore, tmp_path: Path, keys) -> None:
    from tandem.edge.agent.outbox import Outbox
    from tandem.edge.agent.status import collect, format_status

    publish(tmp_path / "repo", keys[0], "1")
    store.install(stage(store, tmp_path / "repo/toy/1", "1"), "toy", "1")
    store.record_attempt("toy", "2", "refused", "output differs", "probation_failed", "ab" * 32)
    box = Outbox(store.data_dir / "outbox.sqlite", max_rows=2)
    box.append([{"kind": "route", "model": "toy", "payload": {"tier": t}} for t in ("edge", "cloud", "edge")])
    (store.data_dir / "agent.json").write_text(json.dumps({"pid": 2**22 + 12345, "url": "http://127.0.0.1:1"}))
    s = collect(store.data_dir)
    assert s["running"] is False  # that pid does not exist
    assert s["models"]["toy"]["active"] == "1" and s["models"]["toy"]["last_attempt"]["outcome"] == "refused"
    assert s["outbox"]["depth"] == 2 and s["outbox"]["dropped_full"] == 1
    assert s["route_mix"]["cloud_share"] == pytest.approx(1 / 3)
    text = format_status(s)
    assert "active 1" in text and "refused 2: probation_failed" in text and "dropped 1 (full)" in text
    assert "not running" in text
