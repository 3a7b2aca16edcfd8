"""The dynamic batcher of one model version: one bounded queue, one thread per instance.

Mechanism (one, like Ray Serve's ``@serve.batch`` or Triton's dynamic batcher):

* :meth:`Batcher.submit` (on the event loop) checks the request's size against
  ``max_request_rows`` (400), refuses at once when the queue is full in requests or in rows
  (:class:`Overloaded`, 503 + Retry-After), when the deadline has already passed, or when the work
  queued ahead would outlast its deadline or ``max_queue_wait_ms`` (503 + Retry-After), else
  appends the request to the deque of its priority level and returns an asyncio future. No task
  is created.
* A request with a deadline (or under ``max_queue_wait_ms``) gets one loop timer: when it fires
  while the request still waits, the request is answered (504, or 503 for the queue bound) and
  leaves the queue's counts at once; the deque entry it leaves behind (a tombstone) is skipped
  by the threads, and the deques are compacted when tombstones make up half of them.
* Each instance (one onnxruntime session) has a thread that takes its own batches: the oldest live
  request of the best priority level and every queued request with the same *signature* (input
  names, dtypes and non-batch dimensions) up to ``max_batch_size`` rows. Requests whose deadline
  has passed are answered with :class:`DeadlineExceeded` before any compute. Requests with other
  signatures stay queued for the next batch, so mixed shapes are all answered. A batch of more
  rows than the instance was warmed with (only possible with ``max_request_rows`` above
  ``max_batch_size``) hands its requests copies of its outputs and is followed by a one-row
  run that shrinks onnxruntime's memory arena:
  without it the arena kept what the large batch took (a 100,000-row batch of a small CNN took
  RSS from 58 MB to 871 MB, and it stayed there; with it, back to 58 MB).
* The thread takes its next batch the moment it finishes one, without waiting for the event loop:
  under load the session never idles while the loop is busy writing responses (it did, ~30% of
  the time, when the loop dispatched every batch). The loop hears back once per batch.
* With ``max_queue_delay_us`` 0 (the default) a thread never waits for a batch to fill: batches
  grow by themselves under load because requests queue while the session computes. With a delay,
  it waits up to that long after the oldest request for ``max_batch_size`` (or a preferred size)
  rows. With ``fill_wait_us``, a thread whose batch ran while others queued waits up to that long
  for the clients it just answered to send again (see :meth:`Batcher._fill_target`).
* The queue is shared by the loop and the threads under one lock; futures are only ever touched
  on the loop (results and errors travel with ``call_soon_threadsafe``).

Requests of different lengths (a model whose inputs declare pad values for a dynamic axis, e.g.
token ids and attention mask along ``sequence``, see :meth:`ModelEngine._plan_padding`) share a
batch when they differ only along such axes: each input is padded to the longest in the batch
with its pad value, and every output carrying a padded axis is cut back to each request's length.
Which of them share a batch is bounded by the padding it costs (see :meth:`Batcher._take_padded`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.shared.errors import (
    DeadlineExceeded,
    DeadlineUnreachable,
    InferenceFailed,
    InvalidInput,
    Overloaded,
    TandemError,
    Unavailable,
)

from .config import BatchingConfig
from .engine import ModelEngine, lower_thread_priority

__all__ = ["BatchResult", "Batcher", "BatchObserver", "threads_computing"]

_log = logging.getLogger(__name__)

#: The share of the load a free instance waits for with ``fill_wait_us`` (see Batcher._fill_target).
_FILL_SHARE = 0.75

#: The most input elements a padded batch may compute per element its requests sent (see
#: Batcher._take_padded for why 1.1).
MAX_PADDING_RATIO = 1.1

#: Queued requests a padded batch is chosen from: the oldest and up to this many after it (a
#: bound on the work done under the queue's lock; deeper requests wait for a later batch).
_PAD_WINDOW = 256

#: A deadline further away than this (seconds) is no deadline: no timer is set for it.
_FOREVER_S = 7 * 24 * 3600.0

#: Tombstones (requests answered by their timer while queued) a queue keeps before it is compacted.
_MIN_TOMBSTONES = 64

# The states of a queued request, changed under the batcher's lock.
_QUEUED = 0
_TAKEN = 1  # taken off the queue by a thread (into a batch, or dropped)
_TIMED_OUT = 2  # answered by its timer while queued: a tombstone in its deque


#: Every instance thread of the process's batchers (they end once their batcher is closed).
_instance_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def threads_computing(wait_s: float) -> int:
    """Instance threads still running after ``wait_s`` seconds at most. Once every batcher is
    closed, each of these is inside a batch that outlived the drain (see server.run)."""
    deadline = time.monotonic() + wait_s
    for t in list(_instance_threads):
        t.join(max(deadline - time.monotonic(), 0.0))
    return sum(t.is_alive() for t in list(_instance_threads))


@dataclass(slots=True)
class BatchResult:
    """What one request gets back: its slice of the batch outputs and the server timing."""

    outputs: dict[str, np.ndarray]
    queue_us: float
    compute_us: float
    batch_size: int


class BatchObserver:
    """Hooks the batcher calls (metrics implement them); the defaults do nothing."""

    def on_batch(self, rows: int, requests: int, compute_us: float, queue_us: Sequence[float]) -> None:
        """One batch ran: ``rows`` in all, ``requests`` of them answered with outputs (a request
        cancelled meanwhile is not), the batch's compute time and each request's queue time."""

    def on_padding(self, sent: int, computed: int) -> None:
        """A batch of a model whose requests may be padded ran: its requests sent ``sent`` input
        elements, the model computed on ``computed`` (padding included)."""

    def on_answered(self, inputs: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]]) -> None:
        """A batch's answers are on their way to the loop: each request's inputs and outputs.
        Called in the instance thread, before it takes its next batch (the drift monitor)."""


class _Pending:
    __slots__ = ("inputs", "rows", "key", "future", "deadline", "enqueued", "lens", "size", "level", "state", "timer", "shed")

    def __init__(
        self, inputs: Mapping[str, np.ndarray], rows: int, key: tuple[Any, ...], future: asyncio.Future[BatchResult],
        deadline: float | None, enqueued: float, lens: tuple[int, ...] = (), size: int = 0,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future = future
        #: time.monotonic() seconds when it expires: its own deadline or the queue bound, the earlier
        self.deadline = deadline
        self.enqueued = enqueued  # time.perf_counter() seconds
        self.lens = lens  # length along each axis the model may pad (ModelEngine.pad_symbols)
        self.size = size  # input elements sent (models that pad)
        self.level = 0  # index of its priority level's deque
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.shed = False  # it expires at max_queue_wait_ms (503), not at its own deadline (504)


def _owned(outcome: list[Any]) -> list[Any]:
    """A batch's outcome with every output array copied into memory of its own."""
    def own(outputs: Any) -> Any:
        return {name: np.array(arr) for name, arr in outputs.items()} if isinstance(outputs, dict) else outputs

    results, compute_us, per_item, *rest = outcome
    return [
        [own(r) for r in results] if results is not None else None,
        compute_us,
        [own(r) for r in per_item] if per_item is not None else None,
        *rest,
    ]


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in inputs.items())


class Batcher:
    """Queue + one thread per instance for one model version. Create inside a running event loop."""

    def __init__(
        self,
        engine: ModelEngine,
        config: BatchingConfig,
        *,
        name: str = "model",
        observer: BatchObserver | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.name = name
        self._observer = observer or BatchObserver()
        self._max_rows = config.max_batch_size if engine.batchable else 1
        self._request_rows = config.request_rows if engine.batchable else 1
        self._max_wait_s = config.max_queue_wait_ms / 1000 if config.max_queue_wait_ms is not None else None
        self._preferred = frozenset(config.preferred_batch_sizes)
        self._delay_s = config.max_queue_delay_us / 1e6
        self._fill_wait_s = config.fill_wait_us / 1e6
        # Validated requests differ in signature only where an input has a dynamic non-batch
        # dimension (names and dtypes are fixed by the model): skip computing it otherwise.
        self._signatures_vary = any(None in t.shape[1:] for t in engine.inputs)
        # Requests of different lengths may share a batch, padded (never for the fixed-shape models).
        self._pads = bool(engine.pad_symbols) and self._max_rows > 1
        self._queues: list[deque[_Pending]] = [deque() for _ in range(config.priority_levels)]
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # a thread waits here for requests
        self._waiting = 0  # threads waiting on _work (under the lock): no notify() when none does
        self._depth = 0  # queued requests (under the lock)
        self._rows = 0  # queued rows (under the lock)
        self._level_rows = [0] * config.priority_levels  # queued rows of each level (under the lock)
        self._tombstones = 0  # entries of the deques answered by their timer (under the lock)
        self._inflight = 0  # requests taken and not yet answered (loop side)
        self._running: set[tuple[_Pending, ...]] = set()  # batches computing (loop side)
        self._batch_s = 0.0  # moving average of one batch's compute time, for Retry-After and admission
        self._closing = False
        self._stopped = False  # threads exit (under the lock)
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._threads = [
            threading.Thread(target=self._thread, args=(i,), name=f"tandem-{name}_{i}", daemon=True)
            for i in range(engine.instances)
        ]
        for t in self._threads:
            t.start()
            _instance_threads.add(t)

    # --- public -----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return self._depth

    @property
    def pending(self) -> int:
        """Requests accepted and not yet answered (queued + computing)."""
        return self._depth + self._inflight

    def priority_level(self, priority: int) -> int:
        """Map a request priority (0 = default) to a level 1..N; raises InvalidInput when out of range."""
        if priority == 0:
            return self.config.default_priority_level or self.config.priority_levels
        if not 1 <= priority <= self.config.priority_levels:
            from tandem.shared.errors import InvalidInput

            raise InvalidInput(f"priority must be 0 (default) or 1..{self.config.priority_levels}, got {priority}")
        return priority

    def submit(
        self, inputs: Mapping[str, np.ndarray], rows: int, *, priority: int = 0, timeout_s: float | None = None
    ) -> asyncio.Future[BatchResult]:
        """Queue one request; the future resolves to a :class:`BatchResult` or raises a TandemError."""
        if self._closing:
            raise Unavailable(f"model {self.name} is shutting down")
        if rows > self._request_rows:
            raise InvalidInput(
                f"model {self.name}: a request may carry at most {self._request_rows} rows (max_request_rows), "
                f"this one has {rows}: send it as requests of at most {self._request_rows} rows"
            )
        if self._depth >= self.config.max_queue_size:
            raise Overloaded(
                f"model {self.name}: queue is full ({self.config.max_queue_size} requests waiting)",
                retry_after=self._retry_after(),
            )
        if self._rows and self._rows + rows > self.config.max_queue_rows:
            raise Overloaded(
                f"model {self.name}: queue is full ({self._rows} rows waiting, at most {self.config.max_queue_rows})",
                retry_after=self._retry_after(),
            )
        level = self.priority_level(priority)
        default = self.config.default_timeout_ms
        if default is not None:
            timeout_s = default / 1000 if timeout_s is None else min(timeout_s, default / 1000)
        if timeout_s is not None:
            if timeout_s <= 0:
                raise DeadlineExceeded(f"model {self.name}: the request's deadline had passed on arrival")
            if not timeout_s < _FOREVER_S:  # inf: no deadline (NaN never gets here)
                timeout_s = None
        expires_s = timeout_s
        if self._max_wait_s is not None or timeout_s is not None:
            self._admit(level, timeout_s)
            if self._max_wait_s is not None and (timeout_s is None or self._max_wait_s < timeout_s):
                expires_s = self._max_wait_s
        loop = self._loop
        fut: asyncio.Future[BatchResult] = loop.create_future()
        deadline = time.monotonic() + expires_s if expires_s is not None else None
        if self._pads:
            key, lens, size = self.engine.batch_key(inputs)
            item = _Pending(inputs, rows, key, fut, deadline, time.perf_counter(), lens, size)
        else:
            item = _Pending(inputs, rows, _signature(inputs) if self._signatures_vary else (), fut, deadline, time.perf_counter())
        item.level = level - 1
        if expires_s is not None:
            item.shed = expires_s != timeout_s
            # Answered when it expires, wherever it waits (not only when a thread reaches it).
            item.timer = loop.call_later(expires_s, self._time_out, item)
        self._idle.clear()
        with self._lock:
            self._queues[level - 1].append(item)
            self._depth += 1
            self._rows += rows
            self._level_rows[level - 1] += rows
            if self._waiting:  # under load every thread is computing: skip Condition's Python
                self._work.notify()
        return fut

    def queue_estimate(self, level: int = 1) -> float:
        """Seconds a request of priority ``level`` (1..N) arriving now would likely wait: the rows
        queued at its level and above, in batches of max_batch_size, times the recent compute time
        of a batch, shared among the instances. 0 before any batch ran. Not counted: what the
        instances are computing now, so it errs short (a request it admits in error is still
        answered at its deadline by its timer)."""
        ahead = sum(self._level_rows[:level])
        return ahead / self._max_rows * self._batch_s / self.engine.instances

    def _admit(self, level: int, timeout_s: float | None) -> None:
        """Refuse a request whose deadline (or max_queue_wait_ms) the queue ahead would outlast."""
        wait = self.queue_estimate(level)
        if not wait:
            return
        if timeout_s is not None and wait > timeout_s:
            raise DeadlineUnreachable(
                f"model {self.name}: the queue ahead holds about {wait * 1e3:.0f} ms of work, "
                f"more than the request's deadline of {timeout_s * 1e3:.0f} ms",
                retry_after=wait,
            )
        # Behind the queue, a request also waits for a batch computing now (up to one batch's
        # time): admitted only if it would still start within the bound, it is rarely shed after
        # waiting for it, and the queue keeps (bound - one batch) of work: full batches when the
        # bound is at least two batches' time.
        if self._max_wait_s is not None and wait + self._batch_s / self.engine.instances > self._max_wait_s:
            raise Overloaded(
                f"model {self.name}: queue is full (about {wait * 1e3:.0f} ms of work waiting, "
                f"max_queue_wait_ms is {self._max_wait_s * 1e3:.0f})",
                retry_after=wait,
            )

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait until every accepted one is answered. True if all were."""
        self._closing = True
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float | None = None) -> None:
        """Drain, then stop the threads; whatever is still queued or computing gets Unavailable."""
        drained = await self.drain(timeout)
        with self._lock:
            self._stopped = True
            left = [item for q in self._queues for item in q if item.state == _QUEUED]
            for item in left:
                item.state = _TAKEN
            for q in self._queues:
                q.clear()
            self._depth = self._rows = self._tombstones = 0
            self._level_rows = [0] * len(self._queues)
            self._work.notify_all()
        if not drained:
            error = Unavailable(f"model {self.name} was unloaded before this request ran")
            for item in left:
                if item.timer is not None:
                    item.timer.cancel()
                if not item.future.done():
                    item.future.set_exception(error)
            # A batch still computing is answered now; its late result is dropped.
            with self._lock:
                running = list(self._running)
            for batch in running:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(Unavailable(f"model {self.name} was unloaded while this request ran"))
        self._idle.set()

    # --- the instance threads ---------------------------------------------------------------------

    def _thread(self, instance: int) -> None:
        lower_thread_priority(self.engine.nice)  # below the loop that feeds it
        answered = 0  # rows of the batch this thread just ran, under load: their clients will send again
        while True:
            with self._lock:
                if not self._depth:
                    answered = 0  # the queue ran dry meanwhile: no load to wait for
                while not self._depth and not self._stopped:
                    self._waiting += 1
                    self._work.wait()
                    self._waiting -= 1
                if self._stopped:
                    return
                if self._delay_s and self._max_rows > 1:
                    self._wait_for_fill()
                if not self._depth:
                    continue  # what was queued timed out meanwhile
                if self._fill_wait_s and answered:
                    self._wait_for_rows(time.perf_counter() + self._fill_wait_s, self._fill_target(answered))
                batch, dropped = self._take()
                if batch:
                    # Counted under the same lock that took them off the queue: pending never dips.
                    self._inflight += len(batch)
                    self._running.add(tuple(batch))
            if dropped:
                self._to_loop(self._expire, dropped)
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outcome: list[Any] = self._execute(instance, batch)
            except Exception as e:  # noqa: BLE001 - a thread must survive anything a batch throws
                outcome = self._isolate(instance, batch, e)
            rows = sum(item.rows for item in batch)
            large = rows > self._max_rows  # larger than any batch the instance was warmed with
            if large:
                # onnxruntime's outputs are views into its arena, which cannot give back a region
                # still in use: the requests get copies, and the arena shrinks below.
                outcome = _owned(outcome)
            # Load is present if requests queued while this batch ran (read before its clients are
            # answered, so a lone client's next request never waits for company).
            answered = rows if self._fill_wait_s and self._depth else 0
            self._to_loop(self._deliver, batch, started, outcome)
            if outcome[0] is not None:
                self._observer.on_answered([item.inputs for item in batch], outcome[0])
            if large:
                self.engine.release_memory(instance)  # see the module docstring

    def _to_loop(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed (process exit after a close() that gave up): nobody to answer

    def _wait_for_fill(self) -> None:
        """Under the lock: give the batch until the oldest request's delay to fill."""
        first = self._head_locked()
        if first is not None:
            self._wait_for_rows(first.enqueued + self._delay_s, self._max_rows)

    def _fill_target(self, answered: int) -> int:
        """Under the lock: the rows worth waiting for after running a batch of ``answered`` rows.

        The present load, not ``max_batch_size``: under a closed loop of N clients (each sends
        again once answered) batches cannot grow past N, and waiting for more left the session
        idle (digits CNN, 2 workers, 64 connections: 15% idle, 10.7k vs 12.1k req/s). The clients
        of the batch just run send again while the loop answers them: three quarters of them plus
        what is queued made the fullest batches for the least waiting (shares of 0.6 and 0.75
        measured alike; 0.9 left the cores 3% idle)."""
        return min(self._max_rows, int(_FILL_SHARE * (self._rows + answered) + 0.5))

    def _wait_for_rows(self, until: float, target: int) -> None:
        """Under the lock: wait until ``target`` rows or a preferred size are queued, or ``until``."""
        while self._rows < target and self._rows not in self._preferred and not self._stopped:
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._waiting += 1
            self._work.wait(remaining)
            self._waiting -= 1

    def _head_locked(self) -> _Pending | None:
        for q in self._queues:
            while q and q[0].state != _QUEUED:
                q.popleft()
                self._tombstones -= 1
            if q:
                return q[0]
        return None

    def _unqueue(self, item: _Pending) -> None:
        """Under the lock: ``item`` (queued) leaves the queue's counts."""
        item.state = _TAKEN
        self._depth -= 1
        self._rows -= item.rows
        self._level_rows[item.level] -= item.rows

    def _take(self) -> tuple[list[_Pending], list[_Pending]]:
        """Under the lock: (the next batch, requests to expire). Cancelled ones are skipped."""
        now = time.monotonic()
        dropped: list[_Pending] = []
        key = head = None
        for q in self._queues:  # the oldest live request of the best level sets the signature
            while q:
                item = q[0]
                if item.state != _QUEUED:
                    q.popleft()
                    self._tombstones -= 1
                    continue
                if item.future.done() or (item.deadline is not None and item.deadline <= now):
                    q.popleft()
                    self._unqueue(item)
                    if not item.future.done():
                        dropped.append(item)
                    continue
                key, head = item.key, item
                break
            if head is not None:
                break
        if head is None:
            return [], dropped
        if self._pads:
            return self._take_padded(head, dropped, now), dropped
        limit = self._max_rows
        batch: list[_Pending] = []
        rows = 0
        for q in self._queues:
            if rows >= limit:
                break
            kept: list[_Pending] = []
            while q and rows < limit:
                item = q.popleft()
                if item.state != _QUEUED:
                    self._tombstones -= 1
                elif item.future.done() or (item.deadline is not None and item.deadline <= now):
                    self._unqueue(item)
                    if not item.future.done():
                        dropped.append(item)
                elif item.key == key and (not batch or rows + item.rows <= limit):
                    batch.append(item)
                    rows += item.rows
                    self._unqueue(item)
                else:
                    kept.append(item)
            if kept:
                q.extendleft(reversed(kept))
        return batch, dropped

    def _take_padded(self, head: _Pending, dropped: list[_Pending], now: float) -> list[_Pending]:
        """Under the lock: the batch of ``head`` (the oldest request) for a model that pads.

        The rule: among the queued requests that differ from ``head`` only in length (at most
        ``_PAD_WINDOW`` looked at), sorted by length, the batch grows from ``head`` one neighbour
        at a time, shorter or longer, whichever keeps the padding lower, while the batch computes
        at most ``max_padding_ratio`` (default ``MAX_PADDING_RATIO``) input elements per element sent (and fits max_batch_size).
        Neighbours further away in the sorted order would only cost more, so it stops there.

        Why a bound on the ratio, not fixed length buckets: it merges any requests whose lengths
        are close, wherever they fall, and keeps the oldest request in the batch (no request
        waits behind younger ones). Why 1.1: a sequence model's compute grows with the elements
        it runs on, so padding is paid in full, while a smaller batch costs little once it holds
        a few hundred tokens (on a 2-core VM a token even cost less in batches of 2-8 than of 32).
        Measured with bench/padding.py (lengths 8-64 from 64 connections, 2 cores shared with
        other work, each run paired with one of the same requests padded to 64 by the client):
        bound 1.1 wasted 8% and served 1.3-2.4x the padded client's req/s; 1.25 wasted 18% and
        served 0.5-1.6x; 1.5 wasted 21%; no bound wasted 41% (0.8x). 1.0 (equal lengths only)
        and 1.05 measured alike with 1.1, which leaves room to merge where batches are small.
        """
        limit = self._max_rows
        key = head.key
        candidates: list[_Pending] = []
        seen: list[list[_Pending]] = []
        budget = _PAD_WINDOW
        for q in self._queues:
            looked: list[_Pending] = []
            while q and budget:
                item = q.popleft()
                budget -= 1
                if item.state != _QUEUED:
                    self._tombstones -= 1
                    continue
                if item.future.done() or (item.deadline is not None and item.deadline <= now):
                    self._unqueue(item)
                    if not item.future.done():
                        dropped.append(item)
                    continue
                looked.append(item)
                if item is not head and item.key == key:
                    candidates.append(item)
            seen.append(looked)
        batch = [head]
        if candidates:
            batch += self._choose(head, candidates, limit)
        chosen = {id(item) for item in batch}
        for q, looked in zip(self._queues, seen):
            q.extendleft(reversed([item for item in looked if id(item) not in chosen]))
        for item in batch:
            self._unqueue(item)
        return batch

    def _choose(self, head: _Pending, candidates: list[_Pending], limit: int) -> list[_Pending]:
        """The requests padded into ``head``'s batch (see :meth:`_take_padded`)."""
        per_row = self._row_elements(head)
        candidates.sort(key=lambda item: item.lens)
        i = 0
        while i < len(candidates) and candidates[i].lens < head.lens:
            i += 1
        below, above = i - 1, i  # next shorter, next longer
        rows, sent, longest = head.rows, head.size, head.lens
        chosen: list[_Pending] = []
        while rows < limit and (below >= 0 or above < len(candidates)):
            best = None
            for side in (below, above):
                if not 0 <= side < len(candidates):
                    continue
                item = candidates[side]
                if rows + item.rows > limit:
                    continue
                lens = tuple(map(max, longest, item.lens))
                ratio = (rows + item.rows) * per_row(lens) / max(1, sent + item.size)
                if best is None or ratio < best[0]:
                    best = (ratio, side, lens)
            if best is None:  # both neighbours have too many rows: look past them
                below, above = below - 1, above + 1
                continue
            ratio, side, lens = best
            if ratio > self.config.max_padding_ratio:
                break
            item = candidates[side]
            chosen.append(item)
            rows, sent, longest = rows + item.rows, sent + item.size, lens
            if side == below:
                below -= 1
            else:
                above += 1
        return chosen

    def _row_elements(self, head: _Pending) -> Any:
        """A function: lengths along the padded axes -> input elements of one row of a batch of
        requests like ``head`` padded to them."""
        terms = []
        for name, arr in head.inputs.items():
            axes = self.engine.pad_axes[name]
            fixed = 1
            padded = {axis for axis, _ in axes}
            for axis in range(1, arr.ndim):
                if axis not in padded:
                    fixed *= arr.shape[axis]
            terms.append((fixed, [s for _, s in axes]))

        def elements(lens: tuple[int, ...]) -> int:
            total = 0
            for fixed, symbols in terms:
                for s in symbols:
                    fixed *= lens[s]
                total += fixed
            return total

        return elements

    def _isolate(self, instance: int, batch: list[_Pending], error: Exception) -> list[Any]:
        """A batch failed: run its requests one by one, so one bad request fails alone."""
        if len(batch) == 1:
            return [None, 0.0, [error]]
        per_item: list[Any] = []
        total_us = 0.0
        for item in batch:
            try:
                (outputs,), compute_us, _ = self._run_batch(instance, [item])
                per_item.append(outputs)
                total_us += compute_us
            except Exception as e:  # noqa: BLE001
                per_item.append(e)
        return [None, total_us, per_item]

    # --- back on the loop -------------------------------------------------------------------------

    def _expire(self, dropped: list[_Pending]) -> None:
        """On the loop: answer requests a thread found expired (their timer had not fired yet)."""
        for item in dropped:
            if item.timer is not None:
                item.timer.cancel()
            if not item.future.done():
                item.future.set_exception(self._expired(item))
        self._check_idle()

    def _time_out(self, item: _Pending) -> None:
        """On the loop, at ``item``'s expiry: if it still waits, answer it and free its place."""
        with self._lock:
            if item.state != _QUEUED:
                return  # taken into a batch (or dropped) meanwhile: the thread answers it
            self._unqueue(item)
            item.state = _TIMED_OUT
            self._tombstones += 1
            if self._tombstones >= _MIN_TOMBSTONES and 2 * self._tombstones >= sum(map(len, self._queues)):
                self._compact()
            idle = not self._depth and not self._inflight
        item.inputs = {}  # its arrays may be large: the tombstone need not hold them
        if not item.future.done():
            item.future.set_exception(self._expired(item))
        if idle:
            self._idle.set()

    def _compact(self) -> None:
        """Under the lock: drop every tombstone from the deques (threads hold no reference to them)."""
        self._queues[:] = [deque(item for item in q if item.state == _QUEUED) for q in self._queues]
        self._tombstones = 0

    def _expired(self, item: _Pending) -> TandemError:
        waited_ms = (time.perf_counter() - item.enqueued) * 1e3
        if item.shed:
            return Overloaded(
                f"model {self.name}: waited {waited_ms:.0f} ms in the queue, the most max_queue_wait_ms allows; "
                "the server is overloaded",
                retry_after=self._retry_after(),
            )
        return DeadlineExceeded(f"model {self.name}: deadline passed after {waited_ms:.1f} ms in the queue")

    def _deliver(self, batch: list[_Pending], started: float, outcome: list[Any]) -> None:
        with self._lock:
            self._running.discard(tuple(batch))
            self._inflight -= len(batch)
        for item in batch:
            if item.timer is not None:
                item.timer.cancel()
        results, compute_us = outcome[0], outcome[1]
        rows = sum(item.rows for item in batch)
        if results is not None:
            if self._batch_s:
                self._batch_s += 0.1 * (compute_us / 1e6 - self._batch_s)
            else:  # the first batch: no average to move from 0 yet
                self._batch_s = compute_us / 1e6
            queue_us = [(started - item.enqueued) * 1e6 for item in batch]
            answered = 0
            for item, outputs, q_us in zip(batch, results, queue_us):
                if not item.future.done():
                    item.future.set_result(BatchResult(outputs, q_us, compute_us, rows))
                    answered += 1
            self._observer.on_batch(rows, answered, compute_us, queue_us)
            if self._pads:
                self._observer.on_padding(sum(item.size for item in batch), outcome[3])
        else:
            for item, got in zip(batch, outcome[2]):
                if item.future.done():
                    continue
                if isinstance(got, Exception):
                    if not isinstance(got, TandemError):
                        _log.error("model %s: request failed: %s: %s", self.name, type(got).__name__, got)
                        got = InferenceFailed(f"inference failed: {type(got).__name__}: {got}")
                    item.future.set_exception(got)
                else:
                    waited_us = (started - item.enqueued) * 1e6
                    item.future.set_result(BatchResult(got, waited_us, compute_us, item.rows))
                    self._observer.on_batch(item.rows, 1, compute_us, [waited_us])
                    if self._pads:
                        self._observer.on_padding(item.size, item.size)
        self._check_idle()

    def _check_idle(self) -> None:
        with self._lock:  # depth and inflight change together under it
            idle = not self._depth and not self._inflight
        if idle:
            self._idle.set()

    # --- internals --------------------------------------------------------------------------------

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained: queued batches x recent batch time / instances."""
        batches = self._rows / self._max_rows + 1
        return max(1.0, batches * self._batch_s / self.engine.instances)

    def _execute(self, instance: int, batch: list[_Pending]) -> list[Any]:
        """Concatenate (padding if the requests' lengths differ), run, slice: the whole batch in
        one executor hop (runs in a worker thread). Returns the outcome [outputs per request,
        compute µs, None (no per-request errors), input elements computed: models that pad only,
        else 0]."""
        results, compute_us, computed = self._run_batch(instance, batch)
        return [results, compute_us, None, computed]

    def _run_batch(self, instance: int, batch: list[_Pending]) -> tuple[list[dict[str, np.ndarray]], float, int]:
        t0 = time.perf_counter()
        if self._pads:
            return self._execute_padded(instance, batch, t0)
        if len(batch) == 1:
            feeds = batch[0].inputs
        else:
            feeds = {name: np.concatenate([item.inputs[name] for item in batch]) for name in batch[0].inputs}
        outputs = self.engine.run(instance, feeds)
        compute_us = (time.perf_counter() - t0) * 1e6
        if len(batch) == 1:
            return [outputs], compute_us, 0
        return self._split(batch, outputs), compute_us, 0

    def _split(self, batch: list[_Pending], outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        total = sum(item.rows for item in batch)
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise InferenceFailed(f"output {name!r} has no batch dimension; cannot split a batch")
        results = []
        offset = 0
        for item in batch:
            results.append({name: arr[offset : offset + item.rows] for name, arr in outputs.items()})
            offset += item.rows
        return results

    def _execute_padded(self, instance: int, batch: list[_Pending], t0: float) -> tuple[list[dict[str, np.ndarray]], float, int]:
        if len(batch) == 1:
            outputs = self.engine.run(instance, batch[0].inputs)
            return [outputs], (time.perf_counter() - t0) * 1e6, batch[0].size
        engine = self.engine
        longest = tuple(map(max, *(item.lens for item in batch)))
        total = sum(item.rows for item in batch)
        feeds: dict[str, np.ndarray] = {}
        computed = 0
        for name, first in batch[0].inputs.items():
            parts = [item.inputs[name] for item in batch]
            axes = engine.pad_axes[name]
            shape = [total, *first.shape[1:]]
            for axis, s in axes:
                shape[axis] = longest[s]
            if all(arr.shape[1:] == tuple(shape[1:]) for arr in parts):
                feeds[name] = np.concatenate(parts)
            else:
                padded = np.full(shape, engine.pad_values[name], dtype=first.dtype)
                offset = 0
                for arr in parts:
                    padded[(slice(offset, offset + len(arr)), *map(slice, arr.shape[1:]))] = arr
                    offset += len(arr)
                feeds[name] = padded
            computed += feeds[name].size
        outputs = engine.run(instance, feeds)
        compute_us = (time.perf_counter() - t0) * 1e6
        results = self._split(batch, outputs)
        for name, axes in engine.unpad_axes.items():
            out = outputs.get(name)
            if out is None:
                continue
            for axis, s in axes:
                if out.ndim <= axis or out.shape[axis] != longest[s]:
                    # The model did not keep the padded length on this axis: each request then
                    # runs alone (see _isolate), never answered with another's padding.
                    raise InferenceFailed(
                        f"output {name!r} axis {axis} has {out.shape[axis] if out.ndim > axis else 'no'} entries, "
                        f"not the {longest[s]} of its padded inputs' {engine.pad_symbols[s]!r}"
                    )
            for item, result in zip(batch, results):
                cut = [slice(None)] * out.ndim
                for axis, s in axes:
                    if item.lens[s] != longest[s]:
                        cut[axis] = slice(0, item.lens[s])
                if any(c.stop is not None for c in cut):
                    result[name] = np.ascontiguousarray(result[name][tuple(cut)])
        return results, compute_us, computed
