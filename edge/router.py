"""The router: a configurable policy plus the shared limits every cloud call must pass.

``Router.decide(budget)`` returns a :class:`~tandem.edge.policies.Decision` in microseconds (no I/O).
``Router.cloud_gate(...)`` is asked at the moment a cloud call would be sent and says why not, if
not: local-only, no endpoint, cost over the call's max, server back-off (Retry-After), spend budget
exhausted, open circuit, not enough time left. It reserves the spend and the breaker's probe when it
says yes; the client reports the outcome with ``cloud_ok``/``cloud_failed``/``cloud_cancelled``.

The cascade needs a confidence for the edge's answers (``Estimates.confidence_kind``). Without one
the router refuses it with :class:`~tandem.shared.errors.NoConfidence` — when it is built, if the
cascade is its policy, else at every call asking for it — rather than escalate every call.
A router without a cloud never escalates, so it refuses nothing.
"""

from __future__ import annotations

import time
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from tandem.shared.errors import DeadlineExceeded, InvalidInput, NoConfidence, Overloaded, TandemError, Unavailable

from .breaker import CircuitBreaker
from .budget import Budget, RetryBudget, ShareBucket, TokenBucket
from .estimates import Estimates, LatencyWindow, no_confidence_message
from .policies import POLICIES, Cascade, CloudOnly, Decision, EdgeOnly, Policy, make_policy

__all__ = ["Router", "RouterConfig", "is_retryable"]


class RouterConfig(BaseModel):
    """Every knob of the router (defaults follow Hystrix, Envoy and Dean & Barroso)."""

    model_config = ConfigDict(extra="forbid")

    #: Deadline of a call whose Budget has no latency_ms: nothing waits longer than this.
    default_deadline_ms: float = Field(3000.0, gt=0)
    #: Price of one cloud call (the server's X-Tandem-Cost replaces it when sent).
    cloud_cost_per_call: float = Field(0.0, ge=0)
    #: Spend allowed per spend_period_s (token bucket); None = unlimited.
    spend_limit: float | None = Field(None, ge=0)
    spend_period_s: float = Field(3600.0, gt=0)
    #: Cascade: a fixed threshold, or the target accuracy to calibrate it for.
    cascade_threshold: float | None = None
    target_accuracy: float | None = Field(None, ge=0, le=1)
    #: Without either: the most accuracy the cascade may lose against the reference variant, as a
    #: one-sided 95% bound on the bundle's validation split (0.003 = 0.3 pt).
    cascade_max_loss: float = Field(0.003, ge=0, le=1)
    #: Threshold used when the bundle has no calibration and none is given.
    fallback_threshold: float = 0.8
    #: Hedged: at most this share of calls may start a second (edge) attempt.
    hedge_max_share: float = Field(0.15, ge=0, le=1)
    hedge_quantile: float = Field(0.95, gt=0, lt=1)
    #: Time kept back from the deadline for an edge fallback: edge p99 × factor + margin (the
    #: margin covers timer and thread wake-up delays, several ms on a busy device).
    edge_reserve_factor: float = Field(1.5, ge=1)
    edge_reserve_margin_ms: float = Field(5.0, ge=0)
    #: The margin grows to this × the measured p99 scheduling slip (timer lateness + thread
    #: hand-off) when that is larger: on a loaded device a fixed margin let late cloud calls
    #: come back after their deadline.
    slip_factor: float = Field(2.0, ge=0)
    #: ... but never beyond this: a longer slip is starvation no margin covers, and one such
    #: moment must not keep every call off the cloud until it is forgotten.
    slip_margin_max_ms: float = Field(25.0, ge=0)
    #: Circuit breaker.
    breaker_window_s: float = Field(10.0, gt=0)
    breaker_min_requests: int = Field(20, ge=1)
    breaker_error_rate: float = Field(0.5, gt=0, le=1)
    breaker_open_s: float = Field(5.0, gt=0)
    #: Retry budget: retries in flight ≤ max(retry_min, retry_ratio × calls in flight); tries per call.
    retry_ratio: float = Field(0.2, ge=0)
    retry_min: int = Field(3, ge=0)
    max_retries: int = Field(1, ge=0)
    #: Edge runtime.
    providers: list[str] | None = None
    intra_op_threads: int = Field(1, ge=1)
    edge_workers: int = Field(2, ge=1)
    warmup_runs: int = Field(3, ge=0)
    #: Cloud client.
    pool_size: int = Field(32, ge=1)
    pin_version: bool = False
    latency_window: int = Field(512, ge=16)
    #: Cloud latency samples older than this are forgotten (None: never), so a cloud the router
    #: stopped using because it looked slow gets measured again.
    cloud_estimate_max_age_s: float | None = Field(30.0, gt=0)
    #: At most one call per interval goes to the cloud although its latency estimate says it will
    #: not fit (it can only go when the edge can still answer in time), to refresh that estimate.
    cloud_probe_interval_s: float = Field(1.0, gt=0)


class Router:
    def __init__(self, config: RouterConfig, estimates: Estimates, policy: str | Policy, *, has_cloud: bool) -> None:
        self.config = config
        self.estimates = estimates
        self.policy = self._make(policy)
        self.has_cloud = has_cloud
        if isinstance(self.policy, Cascade):
            self._check_confidence()
        self.breaker = CircuitBreaker(
            config.breaker_window_s, config.breaker_min_requests, config.breaker_error_rate, config.breaker_open_s
        )
        self.spend = TokenBucket(config.spend_limit, config.spend_period_s) if config.spend_limit is not None else None
        self.hedges = ShareBucket(config.hedge_max_share)
        self.retries = RetryBudget(config.retry_ratio, config.retry_min)
        self._backoff_until = 0.0
        #: How late our own timing runs (ms): a cloud timeout firing after it was due, and the
        #: hand-off from the client's loop to the waiting caller. Forgotten after 30 s, so a burst
        #: of load widens the margin only while it lasts.
        self.timer_slip = LatencyWindow(256, max_age_s=30.0)
        self.handoff_slip = LatencyWindow(256, max_age_s=30.0)
        self._named: dict[str, Policy] = {}
        #: How many calls each (tier, reason head) took — cheap decision log for metrics and tests.
        self.stats: Counter[str] = Counter()
        self._local = Decision("edge", "local_only", "local")
        self._no_cloud = Decision("edge", "no cloud endpoint → edge", "")
        # Decisions that never depend on the estimates, by Budget.policy (None: the client's), so the
        # common edge call gets its plan from one dict lookup (decide() sits on a ~5 µs path).
        self._constant: dict[str | None, Decision] = {"edge-only": EdgeOnly._decision}
        self._constant["cloud-only"] = CloudOnly._decision if has_cloud else self._no_cloud
        if not has_cloud:
            self._constant.update({name: self._no_cloud for name in POLICIES if name != "edge-only"})
        if self.policy.__class__ in (EdgeOnly, CloudOnly) or (not has_cloud and self.policy.__class__ in _BUILT_IN):
            self._constant[None] = self._constant[self.policy.name]
        elif not has_cloud and self.policy.name != "edge-only":
            self._constant[None] = self._no_cloud

    def _make(self, policy: str | Policy) -> Policy:
        c = self.config
        if policy == "cascade":
            return make_policy(
                "cascade",
                threshold=c.cascade_threshold,
                target_accuracy=c.target_accuracy,
                fallback=c.fallback_threshold,
                max_loss=c.cascade_max_loss,
            )
        if policy == "hedged":
            return make_policy("hedged", quantile=c.hedge_quantile)
        if policy == "constrained":
            return make_policy("constrained", probe_interval_s=c.cloud_probe_interval_s)
        return make_policy(policy)

    def decide(self, budget: Budget) -> Decision:
        """The plan for one call. Pure and cheap: reads estimates, never blocks."""
        if budget.local_only:
            return self._local
        p = budget.policy
        if p is None or p.__class__ is str:
            d = self._constant.get(p)
            if d is not None:
                return d
            policy = self.policy if p is None else self._policy_named(p)
        else:
            policy = make_policy(p)
            if isinstance(policy, Cascade):
                self._check_confidence()
        if not self.has_cloud and policy.name != "edge-only":
            return self._no_cloud
        d = policy.decide(budget, self.estimates)
        if policy.__class__ not in _BUILT_IN:
            _check_decision(d, policy)
            if d.plan == "cascade":
                self._check_confidence()
        return d

    def _policy_named(self, name: str) -> Policy:
        pol = self._named.get(name)
        if pol is None:
            pol = self.policy if name == self.policy.name else self._make(name)
            if isinstance(pol, Cascade):
                self._check_confidence()  # before caching: every call asking for it is refused
            self._named[name] = pol
        return pol

    def _check_confidence(self) -> None:
        """Refuse the cascade when the edge cannot score its answers (a cloud-less router never
        escalates, so it can keep the policy)."""
        why = self.estimates.no_confidence
        if why is not None and self.has_cloud:
            raise NoConfidence(no_confidence_message(why))

    # --- the gate every cloud call passes -------------------------------------------------------

    def edge_reserve_ms(self, batch: int = 1) -> float:
        """Time kept back from a call's deadline so the edge can still answer in it."""
        return self.edge_time_ms(batch) + self.margin_ms()

    def edge_time_ms(self, batch: int = 1) -> float:
        """What an edge run is given: its p99 × ``edge_reserve_factor``."""
        return (self.estimates.edge_ms(0.99, batch) or 5.0) * self.config.edge_reserve_factor

    def margin_ms(self) -> float:
        """The part of the reserve for our own lateness: the configured margin, or ``slip_factor``
        × the measured p99 slip (timer + hand-off) when larger, up to ``slip_margin_max_ms``."""
        slip = (self.timer_slip.percentile(0.99) or 0.0) + (self.handoff_slip.percentile(0.99) or 0.0)
        c = self.config
        return max(c.edge_reserve_margin_ms, min(c.slip_factor * slip, c.slip_margin_max_ms))

    def cloud_gate(self, budget: Budget, time_left_ms: float, need_ms: float = 0.0, *, retry: bool = False) -> str | None:
        """None when a cloud call may go now (spend and breaker probe reserved), else why not."""
        if budget.local_only:
            return "local_only"
        if not self.has_cloud:
            return "no cloud endpoint"
        cost = self.estimates.cost_per_call
        if budget.max_cost is not None and cost > budget.max_cost:
            return f"cloud cost {cost:g} > max_cost {budget.max_cost:g}"
        if time_left_ms <= 1.0 or (time_left_ms < need_ms and not self.estimates.cloud_probe_due(self.config.cloud_probe_interval_s)):
            return f"{max(time_left_ms, 0.0):.1f} ms left < {max(need_ms, 1.0):.1f} ms needed by the cloud"
        now = time.monotonic()
        if now < self._backoff_until:
            return f"cloud asked to retry after {self._backoff_until - now:.1f} s"
        if self.spend is not None and self.spend.available() < cost:
            return "spend budget exhausted"
        if retry and not self.retries.try_retry():
            return "retry budget spent"
        if not self.breaker.allow():
            if retry:
                self.retries.retry_done()
            return "circuit open"
        if self.spend is not None and cost and not self.spend.try_take(cost):
            self.breaker.release()
            if retry:
                self.retries.retry_done()
            return "spend budget exhausted"
        return None

    def cloud_ok(self, rtt_ms: float, queue_us: float | None, queue_depth: int | None, server_cost: float | None) -> float:
        """Record a good answer; returns the cost charged for it."""
        reserved = self.estimates.cost_per_call
        self.estimates.observe_cloud(rtt_ms, queue_us, queue_depth, server_cost)
        self.breaker.record(True)
        cost = server_cost if server_cost is not None else reserved
        if self.spend is not None and cost != reserved:
            self.spend.force_take(cost - reserved)
        return cost

    def cloud_failed(self, error: TandemError) -> None:
        """Record a failed call: refund its spend (no answer, no charge) and tell the breaker."""
        self._refund()
        if isinstance(error, InvalidInput):
            self.breaker.release()  # the caller's fault, not the cloud's health
            return
        self.breaker.record(False)
        retry_after = getattr(error, "retry_after", None)
        if isinstance(error, (Overloaded, Unavailable)) and retry_after:
            self._backoff_until = max(self._backoff_until, time.monotonic() + float(retry_after))

    def cloud_cancelled(self) -> None:
        """The call was abandoned by us (hedge lost, caller gone): no health signal, no charge."""
        self._refund()
        self.breaker.release()

    def _refund(self) -> None:
        if self.spend is not None and self.estimates.cost_per_call:
            self.spend.give_back(self.estimates.cost_per_call)


def is_retryable(error: TandemError) -> bool:
    """Transient cloud failures worth another attempt (the gate still decides whether there is one)."""
    return isinstance(error, (Unavailable, Overloaded)) and not isinstance(error, DeadlineExceeded)


_BUILT_IN = frozenset(POLICIES.values())


def _check_decision(d: object, policy: Policy) -> None:
    """An app's own policy gets a clear error for a malformed decision, not a crash mid-call."""
    name = getattr(policy, "name", type(policy).__name__)
    if not isinstance(d, Decision):
        raise InvalidInput(f"policy {name!r} returned {type(d).__name__}, not a Decision")
    if d.plan not in ("edge", "cloud", "cascade", "hedged"):
        raise InvalidInput(f"policy {name!r} returned plan {d.plan!r}; expected edge, cloud, cascade or hedged")
    if d.plan == "cascade" and not isinstance(d.threshold, (int, float)):
        raise InvalidInput(f"policy {name!r} chose a cascade without a numeric threshold")
    if d.plan == "hedged" and d.hedge_after_ms is not None and not isinstance(d.hedge_after_ms, (int, float)):
        raise InvalidInput(f"policy {name!r} chose hedging with a non-numeric hedge_after_ms")
