"""Unit tests of the router's parts: breaker, buckets, estimates, policies, decisions."""

from __future__ import annotations

import time

import pytest

from tandem.edge import Budget, RouterConfig
from tandem.edge.breaker import CircuitBreaker
from tandem.edge.budget import RetryBudget, ShareBucket, TokenBucket
from tandem.edge.estimates import MIN_SAMPLES, Estimates, LatencyWindow, robust_threshold
from tandem.edge.policies import Cascade, Constrained, Decision, EdgeOnly, Hedged, make_policy
from tandem.edge.router import Router
from tandem.shared.bundle import load_bundle
from tandem.shared.errors import InvalidInput, Overloaded, Unavailable


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_trips_at_error_rate_then_half_open_probe_closes_it() -> None:
    clk = Clock()
    b = CircuitBreaker(window_s=10, min_requests=20, error_rate=0.5, open_s=5, clock=clk)
    for _ in range(10):
        assert b.allow()
        b.record(True)
    for _ in range(9):
        b.record(False)
    assert b.state == "closed"  # 19 requests: below the minimum volume
    b.record(False)
    assert b.state == "open" and not b.allow() and b.opened == 1
    clk.t += 5.01
    assert b.state == "half_open"
    assert b.allow()  # the probe
    assert not b.allow()  # only one at a time
    b.record(False)
    assert b.state == "open" and b.opened == 2
    clk.t += 5.01
    assert b.allow()
    b.record(True)
    assert b.state == "closed" and b.closed == 1 and b.allow()


def test_breaker_window_forgets_old_failures_and_lost_probes_are_replaced() -> None:
    clk = Clock()
    b = CircuitBreaker(window_s=10, min_requests=4, error_rate=0.5, open_s=2, clock=clk)
    for _ in range(3):
        b.record(False)
    clk.t += 11
    b.record(False)
    assert b.state == "closed"  # the 3 old failures left the window
    for _ in range(3):
        b.record(False)
    assert b.state == "open"
    clk.t += 2.1
    assert b.allow()
    b.release()  # probe cancelled: slot freed
    assert b.allow()
    clk.t += 2.1  # probe never reported: presumed lost
    assert b.allow()


def test_token_bucket_spends_refills_and_refuses() -> None:
    clk = Clock()
    tb = TokenBucket(1.0, 10.0, clock=clk)
    assert tb.try_take(0.6) and not tb.try_take(0.6)
    clk.t += 2.0  # +0.2
    assert tb.available() == pytest.approx(0.6)
    tb.give_back(5)
    assert tb.available() == pytest.approx(1.0)
    with pytest.raises(InvalidInput):
        TokenBucket(-1, 1)


def test_share_bucket_caps_the_share_and_retry_budget_has_a_floor() -> None:
    s = ShareBucket(0.1)
    taken = 0
    for _ in range(100):
        s.earn()
        taken += s.try_take()
    assert 9 <= taken <= 12
    r = RetryBudget(ratio=0.2, floor=3)
    for _ in range(10):
        r.enter()
    assert [r.try_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(20):
        r.enter()
    assert r.try_retry()  # 30 active: 20% = 6
    r.retry_done()


def test_latency_window_percentiles_and_seed() -> None:
    w = LatencyWindow(64, seed=(2.0, 10.0))
    assert w.percentile(0.5) == 2.0 and w.percentile(0.99) == pytest.approx(10.0)
    for i in range(100):
        w.add(float(i % 10))
    assert w.count == 64
    assert 4 <= w.percentile(0.5) <= 5
    assert w.percentile(0.99) == 9.0
    assert LatencyWindow(8).percentile(0.5) is None
    w2 = LatencyWindow(8)
    for _ in range(MIN_SAMPLES - 1):
        w2.add(1.0)
    assert w2.percentile(0.5) == 1.0


@pytest.mark.parametrize(
    "kw", [{"latency_ms": 0}, {"latency_ms": -1}, {"max_cost": -0.1}, {"target_accuracy": 1.5}, {"latency_ms": float("nan")}]
)
def test_budget_rejects_bad_values(kw: dict) -> None:
    with pytest.raises(InvalidInput, match="Budget"):
        Budget(**kw)


def test_unknown_policy_and_bad_policy_object_are_clear_errors() -> None:
    with pytest.raises(InvalidInput, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(InvalidInput, match="policy must be"):
        make_policy(42)  # type: ignore[arg-type]


@pytest.fixture
def est(toy_bundle, keys) -> Estimates:  # type: ignore[no-untyped-def]
    return Estimates(load_bundle(toy_bundle, [keys[1]]), cost_per_call=0.001)


def test_cascade_threshold_comes_from_the_calibration(est: Estimates) -> None:
    cal = est.calibration
    assert cal is not None
    target = 0.95
    expect = cal.threshold_for(target)
    assert expect is not None
    d = Cascade().decide(Budget(target_accuracy=target), est)
    assert d.plan == "cascade" and d.threshold == expect.threshold
    assert Cascade(threshold=0.3).decide(Budget(), est).threshold == 0.3
    # A target nothing reaches escalates everything.
    assert Cascade().decide(Budget(target_accuracy=1.0 + 0), est).threshold in (float("inf"), *[p.threshold for p in cal.points])
    # No threshold, no target: the calibrated default (robust_threshold), which says why.
    default = Cascade().decide(Budget(), est)
    assert (default.threshold, default.estimates["threshold_why"]) == robust_threshold(cal)
    looser = Cascade(max_loss=0.05).decide(Budget(), est).threshold
    assert looser == robust_threshold(cal, 0.05)[0] and looser <= default.threshold


def test_constrained_picks_what_fits(est: Estimates) -> None:
    pol = Constrained()
    assert pol.decide(Budget(), est).plan == "cloud"  # qualities unknown: the large variant
    assert "max_cost" in pol.decide(Budget(max_cost=0.0001), est).reason
    for _ in range(20):
        est.observe_cloud(40.0, 100.0, 0, None)
    d = pol.decide(Budget(latency_ms=20), est)
    assert d.plan == "edge" and "p95 40.0 ms > budget 20 ms" in d.reason
    # Once per probe interval, the cloud is measured again although it looked too slow.
    est.last_cloud_at -= 2.0
    assert pol.decide(Budget(latency_ms=20), est).plan == "cloud"
    assert pol.decide(Budget(latency_ms=20), est).plan == "edge"
    assert pol.decide(Budget(latency_ms=100), est).plan == "cloud"
    est.edge_accuracy, est.cloud_accuracy = 0.97, 0.96
    assert pol.decide(Budget(latency_ms=100), est).plan == "edge"
    est.observe_cloud(40.0, None, None, 0.5)
    assert est.cost_per_call == 0.5 and est.cost_source == "server"


def test_hedged_waits_for_the_cloud_p95(est: Estimates) -> None:
    assert Hedged(default_after_ms=33).decide(Budget(), est).hedge_after_ms == 33
    for i in range(100):
        est.observe_cloud(float(i), None, None, None)
    assert Hedged().decide(Budget(), est).hedge_after_ms == 95.0


def test_router_gate_reasons_and_custom_policy(est: Estimates) -> None:
    class Always:
        name = "mine"

        def decide(self, budget: Budget, est: Estimates) -> Decision:
            return Decision("cloud", "because", self.name)

    r = Router(RouterConfig(spend_limit=0.0015, cloud_cost_per_call=0.001), est, Always(), has_cloud=True)
    assert r.decide(Budget()).reason == "because"
    assert r.decide(Budget(local_only=True)).reason == "local_only"
    assert r.decide(Budget(policy="edge-only")).plan == "edge"
    assert r.decide(Budget(policy=EdgeOnly())).plan == "edge"
    assert r.cloud_gate(Budget(), 100.0) is None
    assert r.cloud_gate(Budget(), 100.0) == "spend budget exhausted"
    r.cloud_failed(Unavailable("x"))  # refunded
    assert r.cloud_gate(Budget(), 0.5) is not None and "ms left" in r.cloud_gate(Budget(), 0.5)
    est.last_cloud_at = time.monotonic()
    assert r.cloud_gate(Budget(), 100.0, need_ms=200.0).endswith("needed by the cloud")
    est.last_cloud_at -= 2.0  # not measured for a while: this call refreshes the estimate
    assert r.cloud_gate(Budget(), 100.0, need_ms=200.0) is None
    err = Overloaded("busy")
    err.retry_after = 60
    r.cloud_failed(err)
    assert "retry after" in (r.cloud_gate(Budget(), 100.0) or "")
    no_cloud = Router(RouterConfig(), est, "cascade", has_cloud=False)
    assert no_cloud.decide(Budget()).reason == "no cloud endpoint → edge"


def test_decisions_are_cheap(est: Estimates) -> None:
    # Not a speed test (bench/route.py measures); guards against an accidental O(window) decision.
    r = Router(RouterConfig(), est, "constrained", has_cloud=True)
    for i in range(600):
        est.observe_cloud(float(i % 50), None, None, None)
    b = Budget(latency_ms=30)
    t0 = time.perf_counter()
    for _ in range(2000):
        r.decide(b)
    assert (time.perf_counter() - t0) / 2000 < 500e-6


def test_cloud_estimates_expire_so_a_slow_looking_cloud_is_measured_again() -> None:
    w = LatencyWindow(64, max_age_s=0.2)
    for _ in range(20):
        w.add(500.0)
    assert w.percentile(0.95) == 500.0
    time.sleep(1.1)  # past max_age and past the 1 s refresh
    assert w.percentile(0.95) is None  # unknown again: the next policy decision tries the cloud
    for _ in range(MIN_SAMPLES):
        w.add(40.0)
    assert w.percentile(0.95) == 40.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ("edge", "not a Decision"),
        (Decision("gpu", "x", "mine"), "plan 'gpu'"),
        (Decision("cascade", "x", "mine"), "without a numeric threshold"),
    ],
)
def test_an_apps_malformed_decision_is_a_clear_error(est: Estimates, bad: object, match: str) -> None:
    class Mine:
        name = "mine"

        def decide(self, budget: Budget, est: Estimates) -> object:
            return bad

    r = Router(RouterConfig(), est, Mine(), has_cloud=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=match):
        r.decide(Budget())
