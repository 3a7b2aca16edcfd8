"""The edge runtime and HybridClient with no cloud: providers, inputs, confidence, profile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from support import make_bundle, run_onnx
from tandem.edge import Budget, HybridClient, Route, RouterConfig
from tandem.edge.runtime import EdgeRuntime, select_providers
from tandem.quantize.calibration import softmax
from tandem.shared.bundle import load_bundle
from tandem.shared.errors import InvalidInput, UntrustedSignature

X = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)


def test_provider_selection_prefers_accelerators_and_always_ends_with_cpu() -> None:
    assert select_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers(["CUDAExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "XnnpackExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert select_providers(["CPUExecutionProvider"], ["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]


def test_runtime_runs_the_edge_variant_reports_real_providers_and_learns_latency(toy_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    b = load_bundle(toy_bundle, [keys[1]])
    rt = EdgeRuntime(b, providers=["CUDAExecutionProvider"])  # asked for a GPU that is not here
    assert rt.providers == ["CPUExecutionProvider"]
    out = rt.run({"input": X})
    np.testing.assert_allclose(out[0], run_onnx(b.variant_path("edge"), X), rtol=1e-5, atol=1e-6)
    for _ in range(20):
        rt.run({"input": np.repeat(X, 4, axis=0)})
    assert rt.estimates.edge[1].count == 1 and rt.estimates.edge[4].count == 20
    assert rt.estimates.edge_ms(0.5, 4) is not None
    conf = rt.confidence(out)
    assert conf == pytest.approx(float(softmax(out[0]).max()), rel=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"nope": X}, "missing \\['input'\\], unknown \\['nope'\\]"),
        ({"input": X.astype(np.float64)}, "dtype float64; the model expects float32"),
        ({"input": [[1.0] * 64]}, "must be a numpy array"),
        ("text", "inputs must be a numpy array or a dict"),
        ({"input": X, "budget": 5}, "unknown \\['budget'\\]"),
        (np.zeros((1, 63), np.float32), "rejected the inputs"),
    ],
)
def test_bad_inputs_are_clear_errors(toy_bundle: Path, keys, bad, match: str) -> None:  # type: ignore[no-untyped-def]
    with HybridClient(toy_bundle, trusted_keys=[keys[1]]) as c:
        with pytest.raises(InvalidInput, match=match):
            c.infer(bad)


def test_client_without_cloud_serves_every_policy_from_the_edge(toy_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    with HybridClient(toy_bundle, trusted_keys=[keys[1]], policy="cloud-only") as c:
        r = c.infer(X)
        assert r.route.tier == "edge" and r.route.reason == "no cloud endpoint → edge"
        np.testing.assert_allclose(r.outputs["logits"], run_onnx(toy_bundle / "edge-fp32.onnx", X), rtol=1e-5, atol=1e-6)
        d = r.route.to_dict()
        assert d["tier"] == "edge" and d["fallbacks"] == [] and isinstance(d["latency_ms"], float)
    with HybridClient(toy_bundle, trusted_keys=[keys[1]], policy="edge-only") as c:
        r = c.infer({"input": X}, Budget(latency_ms=100))
        assert r.route.policy == "edge-only" and r.route.confidence is None and r.route.cost == 0.0


async def test_async_edge_calls_and_async_context_manager(toy_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    async with HybridClient(toy_bundle, trusted_keys=[keys[1]], policy="cascade") as c:
        rs = await asyncio.gather(*(c.ainfer(X) for _ in range(50)))
    assert all(isinstance(r.route, Route) and r.route.tier == "edge" for r in rs)


def test_bundle_signature_is_checked_and_config_errors_are_clear(toy_bundle: Path, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    from support import make_keys

    _, other_pub = make_keys(tmp_path / "other")
    with pytest.raises(UntrustedSignature):
        HybridClient(toy_bundle, trusted_keys=[other_pub])
    HybridClient(toy_bundle, verify_signature=False).close()
    with pytest.raises(InvalidInput, match="bad router config"):
        HybridClient(toy_bundle, trusted_keys=[keys[1]], config={"spend_limt": 1})
    with pytest.raises(ValueError, match="http"):
        HybridClient(toy_bundle, "localhost:8000", trusted_keys=[keys[1]])
    c = HybridClient(toy_bundle, trusted_keys=[keys[1]], config=RouterConfig(intra_op_threads=1))
    with pytest.raises(InvalidInput, match="budget must be"):
        c.infer(X, {"latency_ms": 5})  # type: ignore[arg-type]
    c.close()
    with pytest.raises(InvalidInput, match="closed"):
        c.infer(X)


def test_edge_only_device_bundle_loads_without_the_cloud_file(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    b = make_bundle(tmp_path / "b", keys[0])
    (b / "cloud-fp32.onnx").unlink()
    with HybridClient(b, trusted_keys=[keys[1]]) as c:
        assert c.infer(X).route.tier == "edge"


def test_cascade_confidence_on_a_batch_is_the_least_confident_row(toy_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    from edge_support import free_port

    xs = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a threshold of 0 never escalates
    with HybridClient(toy_bundle, url, trusted_keys=[keys[1]], policy="cascade", config={"cascade_threshold": 0.0}) as c:
        r = c.infer(xs)
    p = softmax(run_onnx(toy_bundle / "edge-fp32.onnx", xs)).max(1)
    assert r.route.confidence == pytest.approx(float(p.min()), rel=1e-5)
    assert r.route.tier == "edge" and "≥ 0.00" in r.route.reason


def test_confidence_small_and_large_paths_agree_for_softmax_and_margin(toy_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    rt = EdgeRuntime(load_bundle(toy_bundle, [keys[1]]))
    z = np.random.default_rng(5).standard_normal((12, 10)).astype(np.float32)
    p = softmax(z)
    assert rt.confidence([z[:1]]) == pytest.approx(float(p[0].max()), rel=1e-5)
    assert rt.confidence([z]) == pytest.approx(float(p.max(1).min()), rel=1e-5)  # 120 values: numpy path
    assert rt.confidence([z[:6]]) == pytest.approx(float(p[:6].max(1).min()), rel=1e-5)  # several small rows
    rt.estimates.confidence_kind = "margin"
    top = np.sort(p, axis=1)
    margin = top[:, -1] - top[:, -2]
    assert rt.confidence([z[:1]]) == pytest.approx(float(margin[0]), rel=1e-4)
    assert rt.confidence([z]) == pytest.approx(float(margin.min()), rel=1e-4)


def test_sync_call_to_an_unreachable_cloud_is_answered_by_the_edge(toy_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    from edge_support import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    with HybridClient(toy_bundle, url, trusted_keys=[keys[1]], policy="cloud-only") as c:
        r = c.infer(X, Budget(latency_ms=500))
        h = c.infer(X, Budget(latency_ms=500, policy="hedged"))
    assert r.route.tier == "edge" and r.route.reason.startswith("cloud unavailable: cloud unreachable")
    assert r.route.fallbacks and r.route.latency_ms < 500
    np.testing.assert_allclose(r.outputs["logits"], run_onnx(toy_bundle / "edge-fp32.onnx", X), rtol=1e-5, atol=1e-6)
    assert h.route.tier == "edge" and h.route.policy == "hedged"
