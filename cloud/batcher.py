"""The dynamic batcher of one model version: one bounded queue, N workers (one per instance).

Mechanism (one, like Ray Serve's ``@serve.batch`` or Triton's dynamic batcher):

* :meth:`Batcher.submit` validates nothing (the caller did), refuses at once when the queue is full
  (:class:`Overloaded`, 503 + Retry-After) or the deadline has already passed, else appends the
  request to the deque of its priority level and returns an asyncio future. No task is created.
* Each worker (one per onnxruntime session) waits until something is queued, then takes the oldest
  live request of the best priority level and every queued request with the same *signature*
  (input names, dtypes and non-batch dimensions) up to ``max_batch_size`` rows. Requests whose
  deadline has passed are answered with :class:`DeadlineExceeded` here, before any compute.
  Requests with other signatures stay queued for the next batch, so mixed shapes are all answered.
* With ``max_queue_delay_us`` 0 (the default) a worker never waits for a batch to fill: batches grow
  by themselves under load because requests queue while the workers compute. With a delay, a worker
  waits up to that long after the oldest request for ``max_batch_size`` (or a preferred size) rows.
* Concatenating the inputs, running the session and slicing the outputs happen in one executor hop
  per batch; the futures are resolved on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.shared.errors import DeadlineExceeded, InferenceFailed, Overloaded, TandemError, Unavailable

from .config import BatchingConfig
from .engine import ModelEngine

__all__ = ["BatchResult", "Batcher", "BatchObserver"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchResult:
    """What one request gets back: its slice of the batch outputs and the server timing."""

    outputs: dict[str, np.ndarray]
    queue_us: float
    compute_us: float
    batch_size: int


class BatchObserver:
    """Hooks the batcher calls (metrics implement them); the defaults do nothing."""

    def on_batch(self, rows: int, requests: int, compute_us: float, queue_us: Sequence[float]) -> None: ...


class _Pending:
    __slots__ = ("inputs", "rows", "key", "future", "deadline", "enqueued")

    def __init__(
        self, inputs: Mapping[str, np.ndarray], rows: int, key: tuple[Any, ...], future: asyncio.Future[BatchResult],
        deadline: float | None, enqueued: float,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future = future
        self.deadline = deadline  # time.monotonic() seconds
        self.enqueued = enqueued  # time.perf_counter() seconds


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in inputs.items())


class Batcher:
    """Queue + workers for one model version. Create inside a running event loop."""

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
        self._preferred = frozenset(config.preferred_batch_sizes)
        self._delay_s = config.max_queue_delay_us / 1e6
        self._queues: list[deque[_Pending]] = [deque() for _ in range(config.priority_levels)]
        self._depth = 0
        self._rows = 0
        self._inflight = 0
        self._batch_s = 0.0  # moving average of one batch's compute time, for Retry-After
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # One thread per session: a batch never waits for a thread, and threads never exceed sessions.
        self._executor = ThreadPoolExecutor(max_workers=engine.instances, thread_name_prefix=f"tandem-{name}")
        self._workers = [self._loop.create_task(self._work(i), name=f"batcher-{name}-{i}") for i in range(engine.instances)]

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
        if self._depth >= self.config.max_queue_size:
            raise Overloaded(
                f"model {self.name}: queue is full ({self.config.max_queue_size} requests waiting)",
                retry_after=self._retry_after(),
            )
        level = self.priority_level(priority)
        default = self.config.default_timeout_ms
        if default is not None:
            timeout_s = default / 1000 if timeout_s is None else min(timeout_s, default / 1000)
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded(f"model {self.name}: the request's deadline had passed on arrival")
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        fut: asyncio.Future[BatchResult] = self._loop.create_future()
        self._queues[level - 1].append(_Pending(inputs, rows, _signature(inputs), fut, deadline, time.perf_counter()))
        self._depth += 1
        self._rows += rows
        self._idle.clear()
        self._wakeup.set()
        return fut

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait until every accepted one is answered. True if all were."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self, timeout: float | None = None) -> None:
        """Drain, then stop the workers and the executor."""
        drained = await self.drain(timeout)
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if not drained:
            self._fail_all(Unavailable(f"model {self.name} was unloaded before this request ran"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- internals --------------------------------------------------------------------------------

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained: queued batches x recent batch time / instances."""
        batches = self._rows / self._max_rows + 1
        return max(1.0, batches * self._batch_s / self.engine.instances)

    def _fail_all(self, error: TandemError) -> None:
        for q in self._queues:
            while q:
                item = q.popleft()
                if not item.future.done():
                    item.future.set_exception(error)
        self._depth = self._rows = 0
        self._idle.set()

    def _drop(self, item: _Pending, now: float) -> bool:
        """Answer and drop an item that is cancelled or past its deadline; True if dropped."""
        if item.future.done():
            return True
        if item.deadline is not None and item.deadline <= now:
            item.future.set_exception(
                DeadlineExceeded(f"model {self.name}: deadline passed after {(time.perf_counter() - item.enqueued) * 1e3:.1f} ms in the queue")
            )
            return True
        return False

    def _head(self) -> _Pending | None:
        now = time.monotonic()
        for q in self._queues:
            while q:
                item = q[0]
                if self._drop(item, now):
                    q.popleft()
                    self._depth -= 1
                    self._rows -= item.rows
                    continue
                return item
        return None

    def _take(self) -> list[_Pending]:
        first = self._head()
        if first is None:
            return []
        key, limit = first.key, self._max_rows
        now = time.monotonic()
        batch: list[_Pending] = []
        rows = 0
        for q in self._queues:
            if rows >= limit:
                break
            kept: list[_Pending] = []
            while q and rows < limit:
                item = q.popleft()
                if self._drop(item, now):
                    self._depth -= 1
                    self._rows -= item.rows
                elif item.key == key and (not batch or rows + item.rows <= limit):
                    batch.append(item)
                    rows += item.rows
                    self._depth -= 1
                    self._rows -= item.rows
                else:
                    kept.append(item)
            if kept:
                q.extendleft(reversed(kept))
        return batch

    async def _wait_for_fill(self, first: _Pending) -> None:
        """With a queue delay configured, give the batch until the oldest request's delay to fill."""
        until = first.enqueued + self._delay_s
        while self._rows < self._max_rows and self._rows not in self._preferred:
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _work(self, instance: int) -> None:
        while True:
            if not self._depth:
                if not self._inflight:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._delay_s and self._max_rows > 1:
                first = self._head()
                if first is not None:
                    await self._wait_for_fill(first)
            batch = self._take()
            if not batch:
                continue
            self._inflight += len(batch)
            try:
                await self._run(instance, batch)
            finally:
                self._inflight -= len(batch)
                if not self._depth and not self._inflight:
                    self._idle.set()

    async def _run(self, instance: int, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            results, compute_us = await self._loop.run_in_executor(self._executor, self._execute, instance, batch)
        except asyncio.CancelledError:
            # Only a close() that gave up waiting cancels a worker: answer, never strand, the batch.
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Unavailable(f"model {self.name} was unloaded while this request ran"))
            raise
        except Exception as e:  # noqa: BLE001 - a worker must survive anything a batch throws
            if not isinstance(e, TandemError):
                _log.exception("model %s: batch of %d failed", self.name, len(batch))
                e = InferenceFailed(f"inference failed: {type(e).__name__}: {e}")
            if len(batch) > 1:
                # Isolate the culprit: one bad request must not fail the others it was batched with.
                for item in batch:
                    await self._run(instance, [item])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        rows = sum(item.rows for item in batch)
        self._batch_s += 0.1 * (compute_us / 1e6 - self._batch_s)
        queue_us = [(started - item.enqueued) * 1e6 for item in batch]
        for item, outputs, q_us in zip(batch, results, queue_us):
            if not item.future.done():
                item.future.set_result(BatchResult(outputs, q_us, compute_us, rows))
        self._observer.on_batch(rows, len(batch), compute_us, queue_us)

    def _execute(self, instance: int, batch: list[_Pending]) -> tuple[list[dict[str, np.ndarray]], float]:
        """Concatenate, run, slice: the whole batch in one executor hop (runs in a worker thread)."""
        t0 = time.perf_counter()
        if len(batch) == 1:
            feeds = batch[0].inputs
        else:
            feeds = {name: np.concatenate([item.inputs[name] for item in batch]) for name in batch[0].inputs}
        outputs = self.engine.run(instance, feeds)
        compute_us = (time.perf_counter() - t0) * 1e6
        if len(batch) == 1:
            return [outputs], compute_us
        total = sum(item.rows for item in batch)
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise InferenceFailed(f"output {name!r} has no batch dimension; cannot split a batch")
        results = []
        offset = 0
        for item in batch:
            results.append({name: arr[offset : offset + item.rows] for name, arr in outputs.items()})
            offset += item.rows
        return results, compute_us
