"""Routing policies: small objects that turn a budget and the current estimates into a Decision.

A decision is a plan, not the outcome: ``edge`` (run here), ``cloud`` (ask the cloud, the edge
answers if it fails), ``cascade`` (run here, escalate when the edge is unsure) or ``hedged`` (ask the
cloud, start the edge too when the cloud is late). Whether the cloud may really be used at the moment
of sending (circuit, spend, deadline) is checked by the router's gate, so a policy is pure: no I/O,
a few comparisons, microseconds. Apps may pass their own object with ``name`` and ``decide``.

Firebase's hybrid-mode names map as: ONLY_ON_DEVICE = ``edge-only``, ONLY_IN_CLOUD = ``cloud-only``
(still answered by the edge if the cloud fails), PREFER_ON_DEVICE ≈ ``cascade``, PREFER_IN_CLOUD ≈
``hedged``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from tandem.shared.errors import InvalidInput

if TYPE_CHECKING:
    from .budget import Budget
    from .estimates import Estimates

Plan = Literal["edge", "cloud", "cascade", "hedged"]


@dataclass(slots=True)
class Decision:
    """A plan for one call (treat as immutable; not frozen only because frozen init is slower)."""

    plan: Plan
    reason: str
    policy: str
    #: cascade: keep the edge answer when its confidence is >= this.
    threshold: float | None = None
    #: hedged: start the edge when the cloud has not answered after this many ms.
    hedge_after_ms: float | None = None
    #: the estimates this decision used (for the Route record).
    estimates: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    name: str

    def decide(self, budget: Budget, est: Estimates) -> Decision: ...


class EdgeOnly:
    name = "edge-only"
    _decision = Decision("edge", "edge-only policy", "edge-only")

    def decide(self, budget: Budget, est: Estimates) -> Decision:
        return self._decision


class CloudOnly:
    name = "cloud-only"
    _decision = Decision("cloud", "cloud-only policy", "cloud-only")

    def decide(self, budget: Budget, est: Estimates) -> Decision:
        return self._decision


class Constrained:
    """The best expected quality that fits the call's latency and cost budget."""

    name = "constrained"

    def __init__(self, quantile: float = 0.95, probe_interval_s: float = 1.0) -> None:
        self.quantile = quantile
        self.probe_interval_s = probe_interval_s

    def decide(self, budget: Budget, est: Estimates) -> Decision:
        cost = est.cost_per_call
        cloud_ms = est.cloud_ms(self.quantile)
        eq, cq = est.edge_accuracy, est.cloud_accuracy
        used = {"cloud_p95_ms": cloud_ms, "cost_per_call": cost, "edge_accuracy": eq, "cloud_accuracy": cq}
        if budget.max_cost is not None and cost > budget.max_cost:
            return Decision("edge", f"constrained: cloud cost {cost:g} > max_cost {budget.max_cost:g} → edge", self.name, estimates=used)
        if (
            budget.latency_ms is not None
            and cloud_ms is not None
            and cloud_ms > budget.latency_ms
            and not est.cloud_probe_due(self.probe_interval_s)
        ):
            return Decision(
                "edge", f"constrained: cloud p95 {cloud_ms:.1f} ms > budget {budget.latency_ms:g} ms → edge", self.name, estimates=used
            )
        metric = est.quality_metric
        if eq is not None and cq is not None and eq >= cq:
            return Decision("edge", f"constrained: edge {metric} {eq:.4f} ≥ cloud {cq:.4f} → edge", self.name, estimates=used)
        if budget.target_accuracy is not None and eq is not None and eq >= budget.target_accuracy:
            return Decision("edge", f"constrained: edge {metric} {eq:.4f} meets target → edge", self.name, estimates=used)
        fits = "unknown latency" if cloud_ms is None else f"p95 {cloud_ms:.1f} ms"
        return Decision("cloud", f"constrained: cloud (better quality) fits ({fits}, cost {cost:g}) → cloud", self.name, estimates=used)


class Cascade:
    """Edge first; keep its answer when confident enough, else escalate (if the deadline allows).

    The threshold is ``threshold`` when given; else the one the bundle's calibration gives for the
    call's (or the policy's) ``target_accuracy``; else the calibrated default: the most inputs kept
    on the edge whose accuracy loss against the reference is at most ``max_loss`` with 95%
    confidence (:func:`~tandem.edge.estimates.robust_threshold`). The decision's ``estimates`` say
    which threshold and why (``threshold``, ``threshold_why``) and what confidence it is compared
    with (``confidence``: max_softmax, margin, head or custom).
    """

    name = "cascade"

    def __init__(
        self, threshold: float | None = None, target_accuracy: float | None = None, fallback: float = 0.8, max_loss: float = 0.003
    ) -> None:
        self.threshold = threshold
        self.target_accuracy = target_accuracy
        self.fallback = fallback
        self.max_loss = max_loss
        # Decisions depend only on (target, estimates' calibration), so they are made once: a
        # cascade call whose edge answer is kept costs a few µs in all.
        self._decisions: dict[tuple[Estimates, float | None], Decision] = {}

    def decide(self, budget: Budget, est: Estimates) -> Decision:
        target = budget.target_accuracy
        key = (est, target)
        d = self._decisions.get(key)
        if d is None:
            if self.threshold is not None and target is None:
                t, why = self.threshold, "fixed by configuration"
            else:
                t, why = est.cascade_choice(target if target is not None else self.target_accuracy, self.fallback, self.max_loss)
            used = {"threshold": t, "threshold_why": why, "confidence": est.confidence_kind}
            d = Decision("cascade", "cascade", self.name, threshold=t, estimates=used)
            if len(self._decisions) < 64:  # targets come from callers: keep the cache bounded
                self._decisions[key] = d
        return d


class Hedged:
    """Cloud first; when it is later than its p95 (Dean & Barroso), start the edge too; first wins."""

    name = "hedged"

    def __init__(self, quantile: float = 0.95, default_after_ms: float = 50.0) -> None:
        self.quantile = quantile
        self.default_after_ms = default_after_ms

    def decide(self, budget: Budget, est: Estimates) -> Decision:
        after = est.cloud_ms(self.quantile)
        if after is None:
            after = self.default_after_ms
        return Decision("hedged", "hedged", self.name, hedge_after_ms=after, estimates={"hedge_after_ms": after})


POLICIES: dict[str, type] = {p.name: p for p in (EdgeOnly, CloudOnly, Constrained, Cascade, Hedged)}


def make_policy(policy: str | Policy, **kwargs: Any) -> Policy:
    """A policy object from a name (kwargs go to its constructor) or the object itself."""
    if isinstance(policy, str):
        cls = POLICIES.get(policy)
        if cls is None:
            raise InvalidInput(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        return cls(**kwargs)
    if not isinstance(policy, Policy):
        raise InvalidInput(f"a policy must be a name or an object with .name and .decide(), got {type(policy).__name__}")
    return policy
