"""A circuit breaker over cloud calls (Hystrix's rules): closed → open → half-open → closed.

Closed: calls flow; outcomes are counted in 1-second buckets over ``window_s``. When at least
``min_requests`` calls in the window failed at a rate ≥ ``error_rate``, it opens: no calls for
``open_s``. Then one half-open probe is let through; its success closes the circuit, its failure
opens it again. A probe whose outcome never arrives (cancelled) is released, and a probe that has
been out longer than ``open_s`` is presumed lost so the breaker can never wedge.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        window_s: float = 10.0,
        min_requests: int = 20,
        error_rate: float = 0.5,
        open_s: float = 5.0,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.min_requests = min_requests
        self.error_rate = error_rate
        self.open_s = open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._open_until = 0.0
        self._probe_at: float | None = None
        # [second, ok, failed] buckets, oldest first.
        self._buckets: deque[list[int]] = deque()
        self._ok = 0
        self._failed = 0
        #: Number of times the circuit opened / closed again (for tests, logs and metrics).
        self.opened = 0
        self.closed = 0

    @property
    def state(self) -> State:
        with self._lock:
            if self._state == "open" and self._clock() >= self._open_until:
                return "half_open"
            return self._state

    def allow(self) -> bool:
        """Whether a cloud call may go now. In half-open, only the one probe is let through."""
        with self._lock:
            if self._state == "closed":
                return True
            now = self._clock()
            if self._state == "open":
                if now < self._open_until:
                    return False
                self._state = "half_open"
                self._probe_at = now
                return True
            # half-open: one probe at a time; a lost probe is replaced after open_s.
            if self._probe_at is None or now - self._probe_at > self.open_s:
                self._probe_at = now
                return True
            return False

    def record(self, ok: bool) -> None:
        with self._lock:
            now = self._clock()
            if self._state == "half_open":
                self._probe_at = None
                if ok:
                    self._close()
                else:
                    self._open(now)
                return
            if self._state == "open":
                return  # a call that started before the circuit opened
            self._count(now, ok)
            total = self._ok + self._failed
            if total >= self.min_requests and self._failed >= self.error_rate * total:
                self._open(now)

    def release(self) -> None:
        """A call that was allowed ended without an outcome (cancelled): free the probe slot."""
        with self._lock:
            if self._state == "half_open":
                self._probe_at = None

    def _count(self, now: float, ok: bool) -> None:
        sec = int(now)
        b = self._buckets
        if not b or b[-1][0] != sec:
            b.append([sec, 0, 0])
        b[-1][1 if ok else 2] += 1
        if ok:
            self._ok += 1
        else:
            self._failed += 1
        horizon = now - self.window_s
        while b and b[0][0] < horizon:
            _, o, f = b.popleft()
            self._ok -= o
            self._failed -= f

    def _open(self, now: float) -> None:
        self._state = "open"
        self._open_until = now + self.open_s
        self.opened += 1

    def _close(self) -> None:
        self._state = "closed"
        self._buckets.clear()
        self._ok = self._failed = 0
        self.closed += 1
