"""Routing for any task: dict inputs of any sequence length on every path, the cascade's confidence
per task (max-softmax, the bundle's confidence head, the application's function) and the cascade
refused with NoConfidence when there is none. Real ONNX models built with onnx.helper, a real
``tandem serve`` on 127.0.0.1 for the cloud."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_support import CloudProcess
from support import free_port, save_onnx
from tandem.edge import Budget, Decision, HybridClient
from tandem.edge.estimates import Estimates
from tandem.edge.policies import Cascade
from tandem.edge.runtime import EdgeRuntime
from tandem.shared import signing
from tandem.shared.bundle import (
    Calibration,
    CalibrationPoint,
    ConfidenceHead,
    Manifest,
    Provenance,
    Task,
    TensorSpec,
    Variant,
    load_bundle,
    seal_bundle,
)
from tandem.shared.errors import InferenceFailed, NoConfidence

pytestmark = pytest.mark.timeout(180)

DIM = 8
VOCAB = 64
#: Token ids from here on are where the edge's embedding table went wrong.
BAD_FROM = 48
#: Nothing listens here: a cloud that is configured but never reached (or refuses connections).
NO_CLOUD = "http://127.0.0.1:9"
#: Generous: a loaded machine must not turn an escalation into a deadline fallback.
SLOW_OK = Budget(latency_ms=30_000)


# --- models -----------------------------------------------------------------------------------


def embedding_tables() -> tuple[np.ndarray, np.ndarray]:
    """(cloud, edge) tables: unit-norm rows, equal below BAD_FROM; the edge's rows from BAD_FROM on
    are pushed 10 along the first axis, so a text made of them has an edge embedding of norm > 9."""
    rng = np.random.default_rng(3)
    cloud = rng.standard_normal((VOCAB, DIM))
    cloud = (cloud / np.linalg.norm(cloud, axis=1, keepdims=True)).astype(np.float32)
    edge = cloud.copy()
    edge[BAD_FROM:, 0] += 10.0
    return cloud, edge


def make_embedding_onnx(path: Path, table: np.ndarray) -> Path:
    """int64 input_ids + attention_mask [batch, sequence] -> the masked mean of ``table``'s rows."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "eps"], ["count_safe"]),
        helper.make_node("Div", ["summed", "count_safe"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embed",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        ],
    )
    return save_onnx(graph, path)


def make_regression_onnx(path: Path, seed: int) -> Path:
    """x FP32 [batch, 4] -> y FP32 [batch, 1], a linear model."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])],
        "regress",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([0.5], np.float32), "b"),
        ],
    )
    return save_onnx(graph, path)


def masked_mean(table: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
    m = feeds["attention_mask"].astype(np.float32)[..., None]
    return (table[feeds["input_ids"]] * m).sum(1) / np.maximum(m.sum(1), 1e-6)


def texts(*rows: list[int]) -> dict[str, np.ndarray]:
    """A batch of token-id rows of any lengths, padded with 0 to the longest (mask 0 there)."""
    n = max(len(r) for r in rows)
    ids = np.zeros((len(rows), n), np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


GOOD_3 = texts([1, 2, 3])
GOOD_12 = texts(list(range(5, 17)))
BAD_7 = texts([50, 51, 52, 53, 54, 55, 56])
BAD_5 = texts([60, 61, 62, 63, 49])


# --- bundles ----------------------------------------------------------------------------------

#: confidence = sigmoid(-(norm - 2) / 0.25): ~0.98 for the edge's good embeddings (norm <= 1),
#: ~0 for its bad ones (norm > 9).
HEAD = ConfidenceHead(output="embedding", features=["norm"], mean=[2.0], scale=[0.25], weights=[-1.0], bias=0.0)


def _points() -> list[CalibrationPoint]:
    """By hand, on 200 validation rows: the head's 0.5 keeps 80% with no miss (robust pick);
    0.0 keeps all with 40 misses; 0.9 keeps half with none."""
    return [
        CalibrationPoint(threshold=0.0, keep_share=1.0, edge_accuracy_kept=0.8, cascade_accuracy=0.8),
        CalibrationPoint(threshold=0.5, keep_share=0.8, edge_accuracy_kept=1.0, cascade_accuracy=1.0),
        CalibrationPoint(threshold=0.9, keep_share=0.5, edge_accuracy_kept=1.0, cascade_accuracy=1.0),
    ]


def make_embedding_bundle(directory: Path, private_key: Path, confidence: str | None = "head") -> Path:
    """An embedding bundle (cloud and edge tables differ from BAD_FROM on); ``confidence``: the
    calibration's kind, None for no calibration."""
    directory.mkdir(parents=True, exist_ok=True)
    cloud, edge = embedding_tables()
    make_embedding_onnx(directory / "cloud-fp32.onnx", cloud)
    make_embedding_onnx(directory / "edge-fp32.onnx", edge)
    calibration = None
    if confidence is not None:
        calibration = Calibration(
            variant="edge-fp32", reference="cloud-fp32", confidence=confidence, n=200, points=_points(),
            metric="cosine>=0.9", head=HEAD if confidence == "head" else None,
        )
    ids = ["batch", "sequence"]
    manifest = Manifest(
        name="embed",
        version="1",
        task=Task(kind="embedding", output="embedding", output_is_logits=False, metric="cosine", tolerance=0.9),
        inputs=[TensorSpec(name="input_ids", datatype="INT64", shape=ids, pad=0),
                TensorSpec(name="attention_mask", datatype="INT64", shape=ids, pad=0)],
        outputs=[TensorSpec(name="embedding", datatype="FP32", shape=["batch", DIM])],
        variants=[
            Variant(name="cloud-fp32", role="cloud", file="cloud-fp32.onnx", sha256="", size_bytes=0, precision="fp32"),
            Variant(name="edge-fp32", role="edge", file="edge-fp32.onnx", sha256="", size_bytes=0, precision="fp32"),
        ],
        calibration=calibration,
        provenance=Provenance(source="tests/test_edge_tasks.py"),
    )
    seal_bundle(directory, manifest, signing.load_private_key(private_key))
    return directory


def make_regression_bundle(directory: Path, private_key: Path, confidence: str | None = None) -> Path:
    """A regression bundle; ``confidence``: the calibration's kind, None for no calibration."""
    directory.mkdir(parents=True, exist_ok=True)
    make_regression_onnx(directory / "cloud-fp32.onnx", seed=1)
    make_regression_onnx(directory / "edge-fp32.onnx", seed=2)
    calibration = None
    if confidence is not None:
        calibration = Calibration(variant="edge-fp32", reference="cloud-fp32", confidence=confidence, n=200,
                                  points=_points(), metric="rel_error<=0.1")
    manifest = Manifest(
        name="reg",
        version="1",
        task=Task(kind="regression", output="y", output_is_logits=False, metric="rel_quality", tolerance=0.1),
        inputs=[TensorSpec(name="x", datatype="FP32", shape=["batch", 4])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=["batch", 1])],
        variants=[
            Variant(name="cloud-fp32", role="cloud", file="cloud-fp32.onnx", sha256="", size_bytes=0, precision="fp32"),
            Variant(name="edge-fp32", role="edge", file="edge-fp32.onnx", sha256="", size_bytes=0, precision="fp32"),
        ],
        calibration=calibration,
        provenance=Provenance(source="tests/test_edge_tasks.py"),
    )
    seal_bundle(directory, manifest, signing.load_private_key(private_key))
    return directory


X = np.random.default_rng(4).standard_normal((1, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[CloudProcess]:
    """A real ``tandem serve`` on 127.0.0.1 serving the embedding bundle as embed:1."""
    root = tmp_path_factory.mktemp("repo")
    make_embedding_bundle(root / "embed" / "1", keys[0])
    proc = CloudProcess(root, keys[1]).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def embed(cloud: CloudProcess, keys: tuple[Path, Path]) -> Any:
    return load_bundle(cloud.repository / "embed" / "1", [keys[1]])


def edge_answer(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return masked_mean(embedding_tables()[1], feeds)


def cloud_answer(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return masked_mean(embedding_tables()[0], feeds)


# --- confidence per task ----------------------------------------------------------------------


def test_head_confidence_is_the_heads_score_of_the_least_confident_row(embed: Any) -> None:
    rt = EdgeRuntime(embed)
    assert rt.estimates.confidence_kind == "head" and rt.estimates.no_confidence is None
    for feeds in (GOOD_3, BAD_7, texts([1, 2], [50, 51, 52, 53])):
        out = rt.run(dict(feeds))
        np.testing.assert_allclose(out[0], edge_answer(feeds), rtol=1e-5, atol=1e-6)
        assert rt.confidence(out) == pytest.approx(float(HEAD.score(out[0]).min()), rel=1e-12)
    assert rt.confidence(rt.run(dict(GOOD_12))) > 0.9 and rt.confidence(rt.run(dict(BAD_5))) < 0.1


def test_the_calibration_s_verdict_names_the_threshold_s_reason(embed: Any) -> None:
    est = Estimates(embed)
    d = Cascade().decide(Budget(), est)
    assert d.threshold == 0.5 and d.estimates["confidence"] == "head"
    why = d.estimates["threshold_why"]
    assert "80.0% kept" in why and "rows failing cosine>=0.9" in why and "cosine>=0.9 share loss" in why, why
    assert "accuracy" not in why
    t = Cascade().decide(Budget(target_accuracy=0.95), est)
    assert t.threshold == 0.5
    assert t.estimates["threshold_why"].startswith("calibrated for cosine>=0.9 share 0.9500: validation cascade 1.0000")
    strict = Cascade(max_loss=0.0).decide(Budget(), est)  # zero misses on the kept rows still pass
    assert strict.threshold == 0.5


def test_an_application_function_gets_the_outputs_by_name_and_wins_for_any_task(embed: Any, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    seen: list[dict[str, np.ndarray]] = []

    def fn(outputs: dict[str, np.ndarray]) -> np.ndarray:
        seen.append(outputs)
        return np.linspace(0.9, 0.6, len(outputs["embedding"]))

    with HybridClient(embed, NO_CLOUD, confidence=fn, config={"cascade_threshold": 0.5}) as c:
        r = c.infer(texts([1, 2, 3], [4, 5], [6]))
        assert r.route.tier == "edge" and r.route.confidence == pytest.approx(0.6)
        assert r.route.estimates["confidence"] == "custom"
    assert list(seen[-1]) == ["embedding"] and seen[-1]["embedding"].shape == (3, DIM)
    # Over a classifier calibrated for max-softmax, the function's threshold is not that calibration's.
    from support import make_bundle

    toy = load_bundle(make_bundle(tmp_path / "toy", keys[0]), [keys[1]])
    with HybridClient(toy, NO_CLOUD, confidence=lambda outs: 0.97) as c:
        r = c.infer(np.zeros((1, 64), np.float32))
        assert r.route.tier == "edge" and r.route.confidence == 0.97
        why = r.route.estimates["threshold_why"]
        assert why.startswith("fixed fallback 0.8") and "calibrated for its max_softmax confidence" in why, why


def test_a_failing_or_nonsense_confidence_function_is_a_clear_error(embed: Any) -> None:
    def broken(outputs: dict[str, np.ndarray]) -> float:
        raise ValueError("no idea")

    with HybridClient(embed, NO_CLOUD, confidence=broken) as c:
        with pytest.raises(InferenceFailed, match="the confidence function raised ValueError: no idea"):
            c.infer(GOOD_3)
    with HybridClient(embed, NO_CLOUD, confidence=lambda outs: "high") as c:
        with pytest.raises(InferenceFailed, match="confidence function returned str"):
            c.infer(GOOD_3)
    with pytest.raises(Exception, match="confidence must be a function"):
        HybridClient(embed, NO_CLOUD, confidence=0.9)  # type: ignore[arg-type]


# --- the cascade against a real cloud, dict inputs of any length ------------------------------


def test_cascade_keeps_confident_texts_on_the_edge_and_escalates_the_rest(embed: Any, cloud: CloudProcess) -> None:
    with HybridClient(embed, cloud.url) as c:  # the cascade is the default policy
        for feeds in (GOOD_3, GOOD_12, texts([1, 2, 3, 4], [7])):
            r = c.infer(feeds, SLOW_OK)
            assert r.route.tier == "edge" and r.route.reason.startswith("cascade: edge confidence"), r.route
            assert r.route.confidence == pytest.approx(float(HEAD.score(edge_answer(feeds)).min()), rel=1e-5)
            assert r.route.confidence > 0.9
            np.testing.assert_allclose(r.outputs["embedding"], edge_answer(feeds), rtol=1e-5, atol=1e-6)
        for feeds in (BAD_7, BAD_5, texts([1, 2, 3], [50, 51, 52, 53, 54, 55])):  # one unsure row escalates the call
            r = c.infer(feeds, SLOW_OK)
            assert r.route.tier == "cloud", r.route
            assert r.route.reason.startswith("cascade: edge confidence") and r.route.reason.endswith("→ cloud")
            assert r.route.confidence is not None and r.route.confidence < 0.1
            np.testing.assert_allclose(r.outputs["embedding"], cloud_answer(feeds), rtol=1e-5, atol=1e-6)
        assert c.router.stats["cascade: kept on edge"] == 3


async def test_async_cascade_takes_dict_inputs_of_different_lengths(embed: Any, cloud: CloudProcess) -> None:
    async with HybridClient(embed, cloud.url, policy="cascade") as c:
        kept, escalated = await c.ainfer(GOOD_12, SLOW_OK), await c.ainfer(BAD_7, SLOW_OK)
    assert kept.route.tier == "edge" and escalated.route.tier == "cloud"
    np.testing.assert_allclose(kept.outputs["embedding"], edge_answer(GOOD_12), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(escalated.outputs["embedding"], cloud_answer(BAD_7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["edge-only", "cloud-only", "hedged", "constrained"])
async def test_every_policy_takes_dict_inputs(embed: Any, cloud: CloudProcess, policy: str) -> None:
    feeds = texts([50, 2, 3], list(range(1, 10)))
    async with HybridClient(embed, cloud.url, policy=policy) as c:
        for r in (await c.ainfer(feeds, SLOW_OK), c.infer(feeds, SLOW_OK)):
            want = edge_answer(feeds) if r.route.tier == "edge" else cloud_answer(feeds)
            np.testing.assert_allclose(r.outputs["embedding"], want, rtol=1e-5, atol=1e-6)
            if policy == "edge-only":
                assert r.route.tier == "edge"
            if policy == "cloud-only":
                assert r.route.tier == "cloud"


def test_an_unreachable_cloud_falls_back_to_the_edge_with_dict_inputs(embed: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    with HybridClient(embed, url) as c:
        for policy in ("cascade", "cloud-only", "hedged"):
            r = c.infer(BAD_7, Budget(latency_ms=30_000, policy=policy))
            assert r.route.tier == "edge" and r.route.fallbacks, r.route
            if policy != "hedged":  # a hedge may start the edge before the refusal arrives
                assert "cloud unreachable" in r.route.fallbacks[0], r.route
            np.testing.assert_allclose(r.outputs["embedding"], edge_answer(BAD_7), rtol=1e-5, atol=1e-6)


# --- no confidence: the cascade is refused ----------------------------------------------------


def _says_why_and_the_ways_out(e: pytest.ExceptionInfo[NoConfidence], why: str) -> None:
    msg = str(e.value)
    assert why in msg, msg
    assert "confidence=fn" in msg and "confidence head" in msg and "another policy" in msg, msg
    assert e.value.code == "no_confidence"


def test_cascade_as_default_policy_is_refused_at_construction(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    reg = make_regression_bundle(tmp_path / "reg", keys[0])
    with pytest.raises(NoConfidence) as e:
        HybridClient(reg, NO_CLOUD, trusted_keys=[keys[1]])
    _says_why_and_the_ways_out(e, "max-softmax is a classifier's confidence, and this regression bundle has no calibration")
    # The bundle asks for the application's function and none is passed.
    custom = make_regression_bundle(tmp_path / "reg-custom", keys[0], confidence="custom")
    with pytest.raises(NoConfidence) as e:
        HybridClient(custom, NO_CLOUD, trusted_keys=[keys[1]], policy="cascade")
    _says_why_and_the_ways_out(e, "a function the application supplies ('custom') and none was passed")
    # Max-softmax over an embedding is nonsense: no confidence, although calibrated.
    softmax = make_embedding_bundle(tmp_path / "embed-softmax", keys[0], confidence="max_softmax")
    with pytest.raises(NoConfidence) as e:
        HybridClient(softmax, NO_CLOUD, trusted_keys=[keys[1]])
    _says_why_and_the_ways_out(e, "this embedding bundle has a calibration without a confidence head")
    # The ways out work: a function (calibrated for it: its thresholds are used), or another policy.
    with HybridClient(custom, NO_CLOUD, trusted_keys=[keys[1]], confidence=lambda outs: 0.95) as c:
        r = c.infer(X)
        assert r.route.tier == "edge" and r.route.confidence == 0.95
        assert r.route.estimates["threshold"] == 0.5 and "rows failing rel_error<=0.1" in r.route.estimates["threshold_why"]
    with HybridClient(reg, NO_CLOUD, trusted_keys=[keys[1]], policy="edge-only") as c:
        assert c.infer(X).route.tier == "edge"


async def test_cascade_asked_per_call_is_refused_at_that_call(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    reg = make_regression_bundle(tmp_path / "reg", keys[0])
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the cloud-only call falls back
    c = HybridClient(reg, url, trusted_keys=[keys[1]], policy="cloud-only")
    try:
        assert c.infer(X, Budget(latency_ms=5000)).route.tier == "edge"  # fell back; not refused
        for _ in range(2):  # every call asking for it, not only the first
            with pytest.raises(NoConfidence) as e:
                c.infer(X, Budget(policy="cascade"))
            _says_why_and_the_ways_out(e, "regression bundle has no calibration")
            with pytest.raises(NoConfidence):
                await c.ainfer({"x": X}, Budget(policy="cascade"))
        with pytest.raises(NoConfidence):
            c.infer(X, Budget(policy=Cascade(threshold=0.5)))

        class AlwaysCascade:
            name = "mine"

            def decide(self, budget: Budget, est: Estimates) -> Decision:
                return Decision("cascade", "mine", "mine", threshold=0.5)

        with pytest.raises(NoConfidence):
            c.infer(X, Budget(policy=AlwaysCascade()))
        assert c.infer(X, Budget(policy="edge-only")).route.tier == "edge"
        assert c.router.stats["cascade: kept on edge"] == 0 and not any("cascade" in k for k in c.router.stats)
    finally:
        await c.aclose()


def test_without_a_cloud_nothing_escalates_so_nothing_is_refused(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    reg = make_regression_bundle(tmp_path / "reg", keys[0])
    with HybridClient(reg, trusted_keys=[keys[1]]) as c:
        for budget in (None, Budget(policy="cascade")):
            r = c.infer(X, budget)
            assert r.route.tier == "edge" and r.route.reason == "no cloud endpoint → edge"
    rt = EdgeRuntime(load_bundle(reg, [keys[1]]))
    with pytest.raises(NoConfidence, match="regression bundle has no calibration"):
        rt.confidence(rt.run({"x": X}))
