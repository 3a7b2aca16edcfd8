"""Per-call budgets and the token buckets that bound spend, hedges and retries.

:class:`Budget` is what an app passes with each call. The buckets are the router's shared limits:
:class:`TokenBucket` for money per period (edge-only once it is spent, until it refills) and for
the hedge allowance (a share of calls), :class:`RetryBudget` for retries as a share of the requests
in flight (Envoy's retry budget), so a failing cloud never sees a retry storm.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from tandem.shared.errors import InvalidInput

from .policies import POLICIES, Policy


@dataclass(slots=True, frozen=True)
class Budget:
    """What one call may spend. Every field is optional.

    ``latency_ms``: the call's deadline, covering every attempt on every tier. ``max_cost``: the most
    this call may be charged (a cloud call costing more goes to the edge). ``local_only``: never leave
    the device (privacy); no connection is opened. ``policy``: a policy name (one of
    :data:`~tandem.edge.policies.POLICIES`; any other name raises here) or object overriding the
    client's. ``target_accuracy``: the quality the cascade calibrates its threshold for.
    """

    latency_ms: float | None = None
    max_cost: float | None = None
    local_only: bool = False
    policy: str | Policy | None = None
    target_accuracy: float | None = None

    def __post_init__(self) -> None:
        if self.latency_ms is not None and not (_is_num(self.latency_ms) and self.latency_ms > 0):
            raise InvalidInput(f"Budget.latency_ms must be a positive number of ms, got {self.latency_ms!r}")
        if self.max_cost is not None and not (_is_num(self.max_cost) and self.max_cost >= 0):
            raise InvalidInput(f"Budget.max_cost must be a non-negative number, got {self.max_cost!r}")
        if self.target_accuracy is not None and not (_is_num(self.target_accuracy) and 0 <= self.target_accuracy <= 1):
            raise InvalidInput(f"Budget.target_accuracy must be in [0, 1], got {self.target_accuracy!r}")
        if self.policy is not None:
            _check_policy(self.policy)


def _check_policy(policy: Any) -> None:
    """A misspelt policy name fails where the budget is made, not at the first call that uses it."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise InvalidInput(f"Budget.policy {policy!r} is not a policy; expected one of {', '.join(POLICIES)} "
                               "(or an object with .name and .decide())")
    elif not isinstance(policy, Policy):
        raise InvalidInput(f"Budget.policy must be a policy name or an object with .name and .decide(), "
                           f"got {type(policy).__name__}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


class TokenBucket:
    """``capacity`` tokens refilled continuously at ``capacity / period_s`` per second. Thread-safe."""

    def __init__(self, capacity: float, period_s: float, *, clock: Any = time.monotonic) -> None:
        if capacity < 0 or period_s <= 0:
            raise InvalidInput(f"token bucket needs capacity >= 0 and period > 0, got {capacity}, {period_s}")
        self.capacity = float(capacity)
        self._rate = self.capacity / period_s
        self._tokens = self.capacity
        self._clock = clock
        self._t = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._t) * self._rate)
        self._t = now

    def available(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens

    def try_take(self, amount: float) -> bool:
        with self._lock:
            self._refill()
            if amount > self._tokens + 1e-12:
                return False
            self._tokens -= amount
            return True

    def give_back(self, amount: float) -> None:
        with self._lock:
            self._tokens = min(self.capacity, self._tokens + amount)

    def force_take(self, amount: float) -> None:
        """Charge a cost learned after the fact (may go negative: the debt delays the refill)."""
        with self._lock:
            self._tokens -= amount


class ShareBucket:
    """Allows an action on at most ``share`` of events (each event earns ``share`` of a token)."""

    def __init__(self, share: float, burst: float = 5.0) -> None:
        self.share = share
        self.burst = max(1.0, burst)
        self._tokens = 1.0 if share > 0 else 0.0
        self._lock = threading.Lock()

    def earn(self) -> None:
        with self._lock:
            self._tokens = min(self.burst, self._tokens + self.share)

    def try_take(self) -> bool:
        with self._lock:
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class RetryBudget:
    """Retries in flight ≤ max(floor, ratio × requests in flight) (Envoy's retry budget)."""

    def __init__(self, ratio: float = 0.2, floor: int = 3) -> None:
        self.ratio = ratio
        self.floor = floor
        self.active = 0
        self.active_retries = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    def try_retry(self) -> bool:
        with self._lock:
            if self.active_retries < max(self.floor, int(self.ratio * self.active)):
                self.active_retries += 1
                return True
            return False

    def retry_done(self) -> None:
        with self._lock:
            self.active_retries -= 1
