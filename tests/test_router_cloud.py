"""Done-means for the router: a real cloud process on 127.0.0.1, reached through the FaultProxy."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_support import CloudProcess, LoopLag, SchedulerLag, toy_cloud
from tandem.edge import Budget, HybridClient
from tandem.edge.faultproxy import FaultProxy
from tandem.shared.bundle import load_bundle

pytestmark = pytest.mark.timeout(120)

X = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    yield from toy_cloud(tmp_path_factory.mktemp("repo"), keys)


@pytest.fixture(scope="module")
def bundle(cloud: CloudProcess, keys: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    return load_bundle(cloud.repository / "toy" / "1", [keys[1]])


@pytest.fixture
async def proxy(cloud: CloudProcess):  # type: ignore[no-untyped-def]
    p = FaultProxy(upstream=("127.0.0.1", cloud.port), seed=1)
    await p.start()
    yield p
    await p.stop()


def fast_breaker(**kw: object) -> dict[str, object]:
    return {"breaker_open_s": 0.5, "breaker_window_s": 5.0, **kw}


async def test_cloud_only_answers_from_cloud_with_server_timing(bundle, proxy) -> None:  # type: ignore[no-untyped-def]
    async with HybridClient(bundle, proxy.url, policy="cloud-only") as c:
        r = await c.ainfer(X, Budget(latency_ms=2000))
        assert r.route.tier == "cloud", r.route
        assert r.route.model_version == "1"
        assert r.route.request_id and len(r.route.request_id) == 32
        ref = c.runtime.session  # edge session; cloud output must differ from it (a different model)
        assert r.outputs["logits"].shape == (1, 10)
        assert not np.allclose(r.outputs["logits"], ref.run(None, {"input": X})[0])
        assert c.estimates.cloud_rtt.count == 1
        assert c.estimates.cloud_queue.count == 1


def test_sync_api_reaches_the_cloud_through_its_background_loop(bundle, cloud) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    with HybridClient(bundle, cloud.url, policy="cloud-only", config={"cascade_threshold": 1.01}) as c:
        routes = [c.infer(X, Budget(latency_ms=2000)).route for _ in range(5)]
        assert [r.tier for r in routes] == ["cloud"] * 5
        r = c.infer(X, Budget(latency_ms=2000, policy="cascade")).route  # edge inline, then escalated
        assert r.tier == "cloud" and r.reason.startswith("cascade: edge confidence") and r.confidence is not None
        # Many app threads at once share the one background loop.
        with ThreadPoolExecutor(4) as pool:
            mixed = list(pool.map(lambda i: c.infer(X, Budget(latency_ms=2000, local_only=i % 2 == 0)).route, range(40)))
        assert [m.tier for m in mixed] == ["edge", "cloud"] * 20


async def test_cloud_killed_with_1000_calls_in_flight_edge_answers_and_circuit_recovers(bundle, cloud, proxy) -> None:  # type: ignore[no-untyped-def]
    c = HybridClient(bundle, proxy.url, policy="cloud-only", config=fast_breaker(pool_size=64))
    try:
        assert (await c.ainfer(X)).route.tier == "cloud"
        budget = Budget(latency_ms=5000)
        calls = [asyncio.ensure_future(c.ainfer(X, budget)) for _ in range(1000)]
        await asyncio.sleep(0.05)  # let the first ones reach the cloud
        cloud.kill()
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == [], failures[:3]
        tiers = [r.route.tier for r in results]
        assert tiers.count("edge") > 0, "the cloud died mid-flight: some calls must have been answered by the edge"
        # Each call ends by its deadline plus, at worst, the edge pool's queue when all 1000 fall back at once.
        slow = sorted(r.route.latency_ms for r in results)[-3:]
        assert slow[-1] <= 5000 + 2000, (slow, Counter(r.route.fallbacks[0][:120] for r in results if r.route.fallbacks))
        assert c.router.breaker.opened >= 1
        assert any("circuit open" in r.route.reason for r in results if r.route.tier == "edge")
        # Back up: a half-open probe gets through and closes the circuit.
        cloud.start()
        t_end = time.monotonic() + 30
        while c.router.breaker.state != "closed" and time.monotonic() < t_end:
            await c.ainfer(X, Budget(latency_ms=2000))
            await asyncio.sleep(0.05)
        assert c.router.breaker.state == "closed"
        assert c.router.breaker.closed >= 1
        assert (await c.ainfer(X, Budget(latency_ms=2000))).route.tier == "cloud"
    finally:
        await c.aclose()
        if cloud.proc is None or cloud.proc.poll() is not None:
            cloud.start()


@pytest.mark.parametrize("fault", ["partition", "stall"])
@pytest.mark.parametrize("policy", ["cloud-only", "hedged", "cascade"])
async def test_every_call_ends_by_its_deadline_under_partition_or_stall(bundle, proxy, fault: str, policy: str) -> None:  # type: ignore[no-untyped-def]
    config = fast_breaker(cascade_threshold=1.01)  # the cascade always escalates
    async with HybridClient(bundle, proxy.url, policy=policy, config=config) as c:
        first = (await c.ainfer(X, Budget(latency_ms=2000, policy="cloud-only"))).route
        assert first.tier == "cloud", first
        proxy.set(**{fault: True})
        try:
            with SchedulerLag() as lag:
                async with LoopLag() as loop_lag:
                    stall_end = time.monotonic() + 5.0
                    budget = Budget(latency_ms=150)
                    worst, worst_route, n = 0.0, None, 0
                    while time.monotonic() < stall_end and n < (10 if fault == "stall" else 40):
                        for r in await asyncio.gather(*(c.ainfer(X, budget) for _ in range(5))):
                            assert r.route.tier == "edge", r.route
                            if r.route.latency_ms > worst:
                                worst, worst_route = r.route.latency_ms, r.route
                        n += 1
            starved = max(lag.max_ms, loop_lag.max_ms)
            # A call can be starved more than once (before and after its timeout fires).
            assert worst <= 150 + 50 + 2 * starved, f"worst call took {worst:.1f} ms for a 150 ms budget (starved {starved:.0f} ms): {worst_route}"
        finally:
            proxy.clear()


async def test_five_second_stall_single_call_is_bounded(bundle, proxy) -> None:  # type: ignore[no-untyped-def]
    async with HybridClient(bundle, proxy.url, policy="cloud-only") as c:
        await c.ainfer(X)
        proxy.set(stall=True)
        loop = asyncio.get_running_loop()
        loop.call_later(5.0, proxy.clear)
        with SchedulerLag() as lag:
            async with LoopLag() as loop_lag:
                t0 = time.perf_counter()
                r = await c.ainfer(X, Budget(latency_ms=300))
                took = (time.perf_counter() - t0) * 1000
        starved = max(lag.max_ms, loop_lag.max_ms)
        assert r.route.tier == "edge" and took < 330 + starved, (took, starved, r.route)
        assert any("deadline" in f or "did not answer" in f for f in r.route.fallbacks), r.route.fallbacks


async def test_spend_exhaustion_sends_calls_to_the_edge_and_says_why(bundle, proxy) -> None:  # type: ignore[no-untyped-def]
    config = {"cloud_cost_per_call": 0.001, "spend_limit": 0.003, "spend_period_s": 3600}
    async with HybridClient(bundle, proxy.url, policy="cloud-only", config=config) as c:
        routes = [(await c.ainfer(X, Budget(latency_ms=2000))).route for _ in range(6)]
    assert [r.tier for r in routes] == ["cloud"] * 3 + ["edge"] * 3
    assert sum(r.cost for r in routes) == pytest.approx(0.003)
    for r in routes[3:]:
        assert r.reason == "spend budget exhausted → edge" and r.cost == 0.0


async def test_max_cost_per_call_keeps_the_call_on_the_edge(bundle, proxy) -> None:  # type: ignore[no-untyped-def]
    async with HybridClient(bundle, proxy.url, policy="cloud-only", config={"cloud_cost_per_call": 0.01}) as c:
        r = await c.ainfer(X, Budget(max_cost=0.001))
    assert r.route.tier == "edge" and "max_cost" in r.route.reason
    assert proxy.accepted == 0


@pytest.mark.parametrize("policy", ["cloud-only", "hedged", "cascade", "constrained"])
async def test_local_only_never_opens_a_connection(bundle, proxy, policy: str) -> None:  # type: ignore[no-untyped-def]
    async with HybridClient(bundle, proxy.url, policy=policy, config={"cascade_threshold": 1.01}) as c:
        for _ in range(20):
            r = await c.ainfer(X, Budget(local_only=True))
            assert r.route.tier == "edge" and r.route.reason == "local_only"
        r = c.infer(X, Budget(local_only=True))
        assert r.route.reason == "local_only"
    assert proxy.accepted == 0 and proxy.bytes_up == 0


async def test_cascade_keeps_confident_answers_and_escalates_the_rest(bundle, proxy) -> None:  # type: ignore[no-untyped-def]
    xs = np.random.default_rng(3).standard_normal((60, 1, 64)).astype(np.float32)
    async with HybridClient(bundle, proxy.url, policy="cascade", config={"cascade_threshold": 0.5}) as c:
        routes = [(await c.ainfer(x, Budget(latency_ms=2000))).route for x in xs]
    confs = [r.confidence for r in routes]
    assert all(cf is not None for cf in confs)
    for r in routes:
        if r.confidence >= 0.5:
            assert r.tier == "edge" and "≥ 0.50 → edge" in r.reason
        else:
            assert r.tier == "cloud" and r.reason.startswith("cascade: edge confidence") and r.reason.endswith("→ cloud")
    assert {r.tier for r in routes} == {"edge", "cloud"}, "toy data should exercise both branches"


async def test_hedged_starts_the_edge_when_the_cloud_is_late_and_caps_hedges(bundle, proxy) -> None:  # type: ignore[no-untyped-def]
    async with HybridClient(bundle, proxy.url, policy="hedged", config={"hedge_max_share": 0.2}) as c:
        for _ in range(20):  # learn the cloud's latency while it is fast
            await c.ainfer(X, Budget(latency_ms=2000))
        proxy.set(latency_ms=200)
        routes = [(await c.ainfer(X, Budget(latency_ms=1000))).route for _ in range(30)]
        lost = sum(1 for r in routes if r.hedged and r.tier == "edge")
        t_end = time.monotonic() + 3
        while proxy.client_closed < lost and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        assert proxy.client_closed >= lost, "each cloud request that lost its hedge must be cancelled"
    hedged = [r for r in routes if r.hedged]
    assert hedged, "the cloud was far later than its p95: some calls must have been hedged"
    # The first late call is hedged at the fast p95 and the edge wins by ~200 ms.
    assert hedged[0].tier == "edge" and hedged[0].reason == "hedged: cloud late → edge", hedged[0]
    assert hedged[0].latency_ms < 150
    assert len(hedged) <= 1 + 0.2 * 50  # each of the 50 calls earns 0.2 of a hedge, plus the first token
    assert all(r.latency_ms < 1000 for r in routes)


async def test_retry_after_is_respected(bundle, cloud, proxy) -> None:  # type: ignore[no-untyped-def]
    # 429/503 from the server: the client backs off the cloud for Retry-After seconds.
    from tandem.shared.errors import Overloaded

    async with HybridClient(bundle, proxy.url, policy="cloud-only") as c:
        err = Overloaded("queue full")
        err.retry_after = 30.0
        c.router.cloud_failed(err)
        r = await c.ainfer(X, Budget(latency_ms=500))
    assert r.route.tier == "edge" and "retry after" in r.route.reason
    assert proxy.accepted == 0


async def test_cancelling_a_call_closes_its_cloud_connection(bundle, proxy) -> None:  # type: ignore[no-untyped-def]
    async with HybridClient(bundle, proxy.url, policy="cloud-only") as c:
        await c.ainfer(X)
        assert proxy.client_closed == 0  # the pooled connection stays open between calls
        proxy.set(partition=True)  # bytes vanish: the call can only end by cancellation
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.ainfer(X, Budget(latency_ms=10_000)), 0.2)
        t_end = time.monotonic() + 2
        while proxy.client_closed < 1 and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        assert proxy.client_closed >= 1, "the cancelled request's connection must be closed, not left waiting"
