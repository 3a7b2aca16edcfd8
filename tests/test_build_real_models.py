"""Builds of models that are not one-input classifiers: two int64 inputs with a dynamic sequence
axis, embedding and classification tasks, a pretrained teacher used as is, a truncated teacher, the
teacher at lower precision, the checks made before any training, and fp16 that never corrupts ids."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

pytest.importorskip("torch")

from build_support import write_tokens_spec  # noqa: E402
from tandem.quantize.errors import ExportMismatch, SpecError  # noqa: E402
from tandem.quantize.pipeline import build  # noqa: E402
from tandem.quantize.quantize import convert_fp16  # noqa: E402
from tandem.quantize.spec import load_spec  # noqa: E402
from tandem.shared import signing  # noqa: E402
from tandem.shared.bundle import describe, load_bundle  # noqa: E402


@pytest.fixture
def key(tmp_path: Path):  # type: ignore[no-untyped-def]
    priv, pub = signing.generate_keypair(tmp_path / "keys")
    return signing.load_private_key(priv), pub


def _build(spec_dir: Path, tmp_path: Path, key) -> tuple[Path, object]:  # type: ignore[no-untyped-def]
    result = build(load_spec(spec_dir), tmp_path / "repo", key[0], progress=False, echo=lambda s: None)
    return result.bundle_path, result


def test_embedding_model_with_two_int64_inputs_and_dynamic_sequence(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    path, result = _build(write_tokens_spec(tmp_path / "spec"), tmp_path, key)
    bundle = load_bundle(path, key[1])
    m = bundle.manifest
    assert [(t.name, t.datatype, t.shape, t.pad) for t in m.inputs] == [
        ("input_ids", "INT64", ["batch", "sequence"], 0.0), ("attention_mask", "INT64", ["batch", "sequence"], 0.0)]
    assert m.outputs[0].name == "embedding" and m.outputs[0].shape == ["batch", 16]
    assert (m.task.kind, m.task.metric, m.task.tolerance, m.task.output) == ("embedding", "cosine", 0.9, "embedding")
    assert m.schema_version == 2
    # fp16 converted despite the mask's Cast to float, measured, and shipped for GPUs on its quality.
    gpu = bundle.variant("cloud-gpu")
    assert gpu.precision == "fp16" and gpu.metrics.quality > 0.99  # type: ignore[union-attr]
    # ONNX Runtime's pre-processing ran on these graphs (a note would say why not).
    assert all("quant_pre_process" not in (v.notes or "") for v in m.variants)
    edge, cloud = bundle.variant("edge"), bundle.variant("cloud")
    assert edge.metrics.quality is not None and "top10_overlap" in edge.metrics.metrics  # type: ignore[union-attr]
    assert 0.0 <= edge.metrics.metrics["top10_query_overlap"] <= 1.0  # type: ignore[union-attr]
    assert cloud.metrics.quality > 0.99  # type: ignore[union-attr]
    # No confidence exists for an embedding: the build trained a head and calibrated it by the task's verdict.
    cal = m.calibration
    assert cal is not None and cal.confidence == "head" and cal.metric == "cosine>=0.9" and cal.head is not None
    assert cal.points[0].keep_share == 1.0 and cal.points[-1].keep_share == 0.0
    # The served graphs take any sequence length, and the edge graph agrees with the recorded samples.
    sess = ort.InferenceSession(str(bundle.variant_path("edge")), providers=["CPUExecutionProvider"])
    for length in (1, 5, 37):
        out = sess.run(None, {"input_ids": np.ones((2, length), np.int64), "attention_mask": np.ones((2, length), np.int64)})[0]
        assert out.shape == (2, 16)
    inputs, outputs = bundle.load_samples()
    got = sess.run(None, inputs)[0]
    np.testing.assert_allclose(got, outputs[edge.name]["embedding"], atol=1e-4)
    text = describe(bundle)
    assert "embedding, quality = cosine, per-row tolerance 0.9" in text and "(pad 0)" in text and "top10_overlap" in text
    assert "confidence head" in text
    report = result.report_md.read_text()  # type: ignore[attr-defined]
    assert "| variant | shipped as | precision | size MB | cosine |" in report


def test_classifier_with_labels_trains_its_head_and_distils_with_kl(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    spec = write_tokens_spec(tmp_path / "spec", task='{"kind": "classification"}', teacher="classifier_teacher",
                             student="classifier_student", data="labelled", output="logits",
                             extra='{"train_teacher": True, "fp16": False}')
    path, _ = _build(spec, tmp_path, key)
    m = load_bundle(path, key[1]).manifest
    assert m.task.kind == "classification" and m.task.labels == ["low", "mid", "high"]
    assert m.calibration is not None and m.calibration.confidence == "max_softmax" and m.calibration.metric == "accuracy"
    assert not any(v.precision == "fp16" for v in m.variants), "fp16 was turned off"
    assert m.variant("cloud").metrics.accuracy > 0.45, "trained well above chance (1/3)"  # type: ignore[union-attr]


def test_edge_as_the_teacher_at_lower_precision_and_as_a_truncated_teacher(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    spec = write_tokens_spec(tmp_path / "a", teacher="wide_teacher", extra='{"edge": {"kind": "teacher"}}')
    path, _ = _build(spec, tmp_path, key)
    m = load_bundle(path, key[1]).manifest
    assert m.variant("cloud").precision == "fp32" and m.variant("edge").precision.startswith("int8")
    with pytest.raises(SpecError, match="edge.kind 'truncate' needs a teacher with an nn.ModuleList"):
        _build(write_tokens_spec(tmp_path / "b", extra='{"edge": {"kind": "truncate", "layers": 1}}'), tmp_path, key)


def test_an_export_that_cannot_take_other_lengths_fails_before_training(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    spec = write_tokens_spec(tmp_path / "spec", teacher="fixed_length",
                             extra='{"training": {"student_epochs": 100000}}')
    started = time.perf_counter()
    with pytest.raises(ExportMismatch, match=r"cloud-fp32.onnx: (torch.onnx.export failed with dynamic axes|the torch model itself fails at sequence 6)"):
        _build(spec, tmp_path, key)
    assert time.perf_counter() - started < 120, "the failure must come before 100000 epochs of training"
    assert not list((tmp_path / "repo" / "tokens").glob(".*building*")), "no half-built bundle is left behind"


def test_an_output_named_like_an_internal_value_is_renamed_not_refused(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    # The exporter names the nn.Embedding's op "embedding": an output of that name used to make a
    # graph onnxruntime refuses ("Duplicate definition of name").
    path, _ = _build(write_tokens_spec(tmp_path / "spec", extra='{"fp16": False}'), tmp_path, key)
    names = [o.name for o in onnx.load(str(path / "cloud-fp32.onnx")).graph.output]
    assert names == ["embedding"]


def test_fp16_keeps_integer_inputs_exact(tmp_path: Path) -> None:
    # ids -> float -> int64 -> embedding lookup: a round trip through float the exporter emits for
    # some index arithmetic. Converted to fp16 the ids above 2048 would round and pick wrong rows.
    vocab = 40000
    table = (np.arange(vocab) % 64).astype(np.float32).reshape(vocab, 1)  # exact in fp16
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["f"], ["back"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "back"], ["out"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 1])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    src, dst = tmp_path / "m.onnx", tmp_path / "m16.onnx"
    # IR 8, as the test models elsewhere: onnx's default is its newest IR, which an older
    # onnxruntime refuses to load.
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(src))
    convert_fp16(src, dst)
    assert [i.type.tensor_type.elem_type for i in onnx.load(str(dst)).graph.input] == [TensorProto.INT64]
    ids = np.array([[2049, 30521, 7]], np.int64)
    out = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(out[..., 0], ids % 64)


def test_spec_errors_name_the_problem(tmp_path: Path) -> None:
    d = write_tokens_spec(tmp_path / "a", data="labelled", extra='{"train_teacher": True}')
    with pytest.raises(SpecError, match="a embedding teacher cannot be trained from labels|train_teacher"):
        build(load_spec(d), tmp_path / "repo", signing.generate_keypair(tmp_path / "k")[0] and signing.load_private_key(tmp_path / "k" / "tandem.key"), progress=False, echo=lambda s: None)
    d = write_tokens_spec(tmp_path / "b", extra='{"inputs": [{"name": "input_ids", "dtype": "int32", "shape": ["batch", "sequence"]}, {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]}')
    from tandem.quantize.spec import load_dataset

    with pytest.raises(SpecError, match="train input 'input_ids' must be int32 as declared, got int64"):
        load_dataset(load_spec(d), 0)
    d = write_tokens_spec(tmp_path / "c", extra='{"task": {"kind": "custom"}}')
    with pytest.raises(SpecError, match="a custom task needs a metric function"):
        load_spec(d)
    d = write_tokens_spec(tmp_path / "d", extra='{"student": None}')
    with pytest.raises(SpecError, match="edge.kind 'student' needs a student factory"):
        load_spec(d)


def test_a_users_onnx_file_becomes_a_bundle_with_one_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from build_support import TOKENS_MODELS
    from tandem.quantize.export import export_onnx
    from tandem.shared.cli import main

    namespace: dict = {}
    exec(TOKENS_MODELS, namespace)
    model = namespace["wide_teacher"]()
    ids = np.ones((3, 12), np.int64)
    onnx_path = export_onnx(model, {"input_ids": ids, "attention_mask": ids}, tmp_path / "my model.onnx",
                            inputs=_decls(), output_names=["sentence_embedding"])
    del torch
    signing.generate_keypair(tmp_path / "keys")
    code = main(["build", str(onnx_path), "--task", "embedding", "--repository", str(tmp_path / "repo"),
                 "--key", str(tmp_path / "keys" / "tandem.key"), "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    bundle = load_bundle(tmp_path / "repo" / "my-model" / "1", tmp_path / "keys" / "tandem.pub")
    m = bundle.manifest
    assert [(t.name, t.shape, t.pad) for t in m.inputs] == [("input_ids", ["batch", "sequence"], 0.0),
                                                            ("attention_mask", ["batch", "sequence"], 0.0)]
    assert m.task.output == "sentence_embedding" and m.task.kind == "embedding"
    assert m.variant("cloud").precision == "fp32" and m.variant("edge").precision.startswith("int8")
    assert m.calibration is not None and m.calibration.confidence == "head"
    assert "my-model:1" in out.out


def test_a_broken_onnx_file_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tandem.shared.cli import main

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code = main(["build", str(bad), "--repository", str(tmp_path / "repo"), "--key", str(tmp_path / "k.key")])
    assert code == 1
    assert "error: ONNX Runtime cannot load" in capsys.readouterr().err


def _decls():  # type: ignore[no-untyped-def]
    from tandem.quantize.spec import TensorDecl

    return [TensorDecl(name=n, dtype="int64", shape=["batch", "sequence"], pad=0) for n in ("input_ids", "attention_mask")]


def test_a_built_two_input_bundle_serves_and_routes_end_to_end(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    """build -> tandem serve -> HybridClient, int64 dict inputs of several lengths on every tier."""
    from edge_support import CloudProcess
    from tandem.edge import Budget, HybridClient

    path, _ = _build(write_tokens_spec(tmp_path / "spec", extra='{"fp16": False}'), tmp_path, key)
    bundle = load_bundle(path, key[1])
    sessions = {role: ort.InferenceSession(str(bundle.variant_path(role)), providers=["CPUExecutionProvider"])
                for role in ("edge", "cloud")}
    proc = CloudProcess(tmp_path / "repo", key[1]).start()
    rng = np.random.default_rng(3)
    try:
        with HybridClient(bundle, proc.url) as client:
            for length in (3, 9, 20, 31):
                ids = rng.integers(1, 500, size=(2, length)).astype(np.int64)
                feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                for policy, role in (("edge-only", "edge"), ("cloud-only", "cloud")):
                    r = client.infer(feeds, Budget(policy=policy, latency_ms=30_000))
                    assert r.route.tier == role, r.route
                    np.testing.assert_allclose(r.outputs["embedding"], sessions[role].run(None, feeds)[0], atol=1e-5)
                r = client.infer(feeds, Budget(policy="cascade", latency_ms=30_000))
                assert r.route.tier in ("edge", "cloud") and r.route.confidence is not None
                assert r.outputs["embedding"].shape == (2, 16)
    finally:
        proc.stop()


def test_retrieval_overlaps_tell_an_index_of_its_own_from_queries_into_the_reference_index() -> None:
    """Both overlaps are 1 for the reference itself. An embedding that moves every row the same way
    (a rotation) keeps its own neighbours (index overlap 1) but, as a query into the reference's
    index, finds other rows; noise lowers both."""
    from tandem.quantize.quality import query_overlap, retrieval_overlap

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((200, 8))
    assert retrieval_overlap(ref, ref, 5) == 1.0 and query_overlap(ref, ref, 5) == 1.0
    rotation = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    rotated = ref @ rotation
    assert retrieval_overlap(rotated, ref, 5) == pytest.approx(1.0)
    assert query_overlap(rotated, ref, 5) < 0.5
    noisy = ref + 0.3 * rng.standard_normal(ref.shape)
    assert 0.2 < query_overlap(noisy, ref, 5) < 1.0 and 0.2 < retrieval_overlap(noisy, ref, 5) < 1.0
    assert np.isnan(query_overlap(ref[:1], ref[:1], 5))


def test_an_fp16_variant_is_judged_on_quality_not_cpu_speed() -> None:
    from tandem.quantize.evaluate import hardware_info
    from tandem.quantize.quantize import Candidate, judge
    from tandem.quantize.spec import Budgets
    from tandem.shared.bundle import VariantMetrics

    hw = hardware_info()

    def metrics(q: float, p50: float) -> VariantMetrics:
        return VariantMetrics(quality=q, n_eval=10, latency_p50_ms=p50, latency_p99_ms=p50, throughput_per_s=1.0,
                              throughput_batch_size=8, intra_op_threads=1, provider="CPUExecutionProvider", hardware=hw)

    parent = metrics(1.0, 1.0)
    slow_but_good = Candidate("cloud-fp16", None, Path("x"), "cloud-fp32", "fp16", metrics=metrics(0.999, 5.0))
    judge(slow_but_good, parent, Budgets(), "cosine", gpu=True)
    assert slow_but_good.accepted and "speed not judged" in slow_but_good.reason
    broken = Candidate("cloud-fp16", None, Path("x"), "cloud-fp32", "fp16", metrics=metrics(0.55, 0.5))
    judge(broken, parent, Budgets(), "cosine", gpu=True)
    assert not broken.accepted and broken.reason == "cosine drop 0.4500 > budget 0.0100 (0.5500 vs fp32 1.0000)"


# These tests are about the task's path (metric, verdict, calibration), not how good a tiny student gets.
_ANY_EDGE = '{"fp16": False, "budgets": {"edge_min_relative_accuracy": 0.0, "edge_min_speedup": 0.0}}'


def test_regression_and_a_users_own_metric(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    spec = write_tokens_spec(tmp_path / "r", task='{"kind": "regression", "tolerance": 0.2}', teacher="regression_teacher",
                             student="regression_student", output="value", extra=_ANY_EDGE)
    m = load_bundle(_build(spec, tmp_path, key)[0], key[1]).manifest
    assert (m.task.kind, m.task.metric, m.task.tolerance) == ("regression", "rel_quality", 0.2)
    assert "rel_error" in m.variant("edge").metrics.metrics  # type: ignore[union-attr]
    assert m.calibration is not None and m.calibration.metric == "rel_error<=0.2" and m.calibration.confidence == "head"
    spec = write_tokens_spec(tmp_path / "c", task='{"kind": "custom", "metric": close_enough, "metric_name": "closeness", "tolerance": 0.9}',
                             teacher="regression_teacher", student="regression_student", output="value",
                             extra=_ANY_EDGE)
    m = load_bundle(_build(spec, tmp_path / "c2", key)[0], key[1]).manifest
    assert (m.task.kind, m.task.metric) == ("custom", "closeness")
    assert m.variant("cloud").metrics.quality > 0.9  # type: ignore[union-attr]
    assert m.calibration is not None and m.calibration.metric == "closeness>=0.9"


def test_the_student_learns_from_unlabelled_inputs_too(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    lines: list[str] = []
    spec = write_tokens_spec(tmp_path / "spec", data="with_unlabelled", extra='{"fp16": False}')
    result = build(load_spec(spec), tmp_path / "repo", key[0], progress=False, echo=lines.append)
    assert any("1200 train / 300 val / 300 test + 500 unlabelled" in line for line in lines), lines
    assert load_bundle(result.bundle_path, key[1]).manifest.variant("edge").metrics.quality > 0.5  # type: ignore[union-attr]
