"""Prometheus metrics with Triton-like meaning (names fixed by the contract, labels model/version).

``tandem_inference_count_total / tandem_inference_exec_count_total`` is the mean batch size, as
``nv_inference_count / nv_inference_exec_count`` is in Triton. Each app has its own registry so that
several servers can live in one process (tests) without clashing.

With ``tandem serve --workers N`` (N > 1) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` and each
worker process writes its values there; ``render`` then sums every worker's files, so ``/metrics``
from any worker shows server totals. Gauges are 'livesum' (dead workers' gauges drop out; counters
and histograms of dead workers stay, so totals survive a restart). ``set_function`` does not work
across processes, so in that mode the pending gauge is copied from the batchers by ``refresh``.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .batcher import BatchObserver

__all__ = ["Metrics", "ModelMetrics", "CONTENT_TYPE_LATEST", "model_statistics", "multiprocess_dir", "observe_all"]


def multiprocess_dir() -> str | None:
    """The directory shared by the worker processes of one server, or None (one process)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

_LABELS = ("model", "version")
_US_BUCKETS = (50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1e6, 2.5e6, 5e6)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0)


class Metrics:
    """All of one server's metrics, in its own registry."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # Per model version: the live pending count, copied into the gauge by refresh() when the
        # gauge cannot call it itself (multiprocess mode).
        self._pending_sources: dict[tuple[str, str], Callable[[], float]] = {}
        # Callables that publish counters kept as plain ints on the hot path (see on_refresh).
        self._syncs: list[Callable[[], None]] = []
        r = self.registry = CollectorRegistry()
        self.success = Counter("tandem_inference_request_success", "Inference requests answered with outputs", _LABELS, registry=r)
        self.failure = Counter(
            "tandem_inference_request_failure", "Inference requests that failed, by reason", (*_LABELS, "reason"), registry=r
        )
        self.count = Counter("tandem_inference_count", "Inferences performed (rows; a batch of 8 counts 8)", _LABELS, registry=r)
        self.exec_count = Counter("tandem_inference_exec_count", "Model executions (batches)", _LABELS, registry=r)
        self.queue_us = Histogram(
            "tandem_inference_queue_duration_us", "Time a request waited in the queue (us)", _LABELS, buckets=_US_BUCKETS, registry=r
        )
        self.compute_us = Histogram(
            "tandem_inference_compute_infer_duration_us", "Time one batch spent in the model (us)", _LABELS, buckets=_US_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "tandem_inference_batch_size", "Rows per executed batch", _LABELS, buckets=_BATCH_BUCKETS, registry=r
        )
        # As Triton's nv_inference_compute_infer_duration_us: per request, so the statistics
        # extension's compute_infer (and perf_analyzer's server-side breakdown) have Triton's meaning.
        self.request_compute_us = Counter(
            "tandem_inference_request_compute_duration_us",
            "Compute time summed over the requests each batch answered (a batch of 8 requests taking 2 ms adds 16 ms)",
            _LABELS, registry=r,
        )
        self.last_inference_ms = Gauge(
            "tandem_inference_last_timestamp_ms", "When the model last finished a batch (ms since the Unix epoch)", _LABELS,
            registry=r, multiprocess_mode="max",
        )
        self.pending = Gauge(
            "tandem_inference_pending_request_count", "Requests accepted and not yet answered", _LABELS, registry=r,
            multiprocess_mode="livesum",
        )
        self.instances = Gauge(
            "tandem_model_instances", "Sessions serving the model, by execution provider in use", (*_LABELS, "provider"),
            registry=r, multiprocess_mode="livesum",
        )
        # Padding (models whose inputs declare pad values): waste = 1 - sent / computed.
        self.input_elements = Counter(
            "tandem_inference_input_elements",
            "Input elements the requests sent (models whose requests may be padded to share a batch)", _LABELS, registry=r,
        )
        self.padded_input_elements = Counter(
            "tandem_inference_padded_input_elements",
            "Input elements the model computed on, padding included (models whose requests may be padded)", _LABELS, registry=r,
        )
        self.padding_ratio = Histogram(
            "tandem_inference_batch_padding_ratio",
            "Input elements computed per element sent, per executed batch (1 = no padding)", _LABELS,
            buckets=_PADDING_BUCKETS, registry=r,
        )
        self.cache_hits = Counter("tandem_response_cache_hits", "Requests answered from the response cache", _LABELS, registry=r)
        # Data drift and live quality (cloud/monitor.py); with --workers N each worker profiles its
        # own share of the traffic, and the worst worker's score is the one shown.
        self.drift_score = Gauge(
            "tandem_drift_score", "Largest per-feature PSI of the served traffic against the bundle's reference profile",
            _LABELS, registry=r, multiprocess_mode="max",
        )
        self.drift_drifting = Gauge(
            "tandem_drift_drifting", "1 when the drift score is at or above monitoring.threshold", _LABELS, registry=r,
            multiprocess_mode="max",
        )
        self.drift_feature = Gauge(
            "tandem_drift_feature_psi", "PSI of each of the monitoring.top_features most drifted features (others not shown)",
            (*_LABELS, "feature"), registry=r, multiprocess_mode="max",
        )
        self.drift_rows = Gauge(
            "tandem_drift_window_rows", "Rows in the running profile's window", _LABELS, registry=r, multiprocess_mode="livesum",
        )
        self.input_quality = Gauge(
            "tandem_input_quality_rows", "Rows profiled (check=rows) and rows failing each input-quality check since the version loaded",
            (*_LABELS, "check"), registry=r, multiprocess_mode="livesum",
        )
        self.live_quality = Gauge(
            "tandem_live_quality", "Rolling quality: accuracy on labelled feedback, edge-vs-cloud agreement on escalations",
            (*_LABELS, "measure"), registry=r, multiprocess_mode="max",
        )
        # The HTTP front door (cloud/front.py): what share of the traffic takes the fast path.
        self.front_requests = Counter("tandem_front_door_requests", "Infer requests the front door answered itself", registry=r)
        self.front_handoffs = Counter(
            "tandem_front_door_handoffs", "Connections the front door handed to aiohttp (a request it does not take)", registry=r
        )
        self.front_errors = Counter(
            "tandem_front_door_internal_errors", "Connections dropped by a front-door failure (a bug: see the log)", registry=r
        )

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def on_refresh(self, sync: Callable[[], None]) -> None:
        """Call ``sync`` at each :meth:`refresh` (each scrape, and periodically with --workers N):
        a hot path may count in a plain int and publish the difference then."""
        self._syncs.append(sync)

    def refresh(self) -> None:
        """Run the on_refresh syncs; copy the live pending counts into the gauge (multiprocess mode)."""
        for sync in self._syncs:
            sync()
        if not self.multiprocess:
            return
        for labels, pending in list(self._pending_sources.items()):
            self.pending.labels(*labels).set(pending())

    def render(self) -> bytes:
        return generate_latest(self._collected())

    def snapshot(self) -> dict[tuple[str, str, str], float]:
        """Every per-model sample as {(sample name, model, version): value}, summed over the other
        labels (reason, provider) and, with --workers N, over the workers."""
        values: dict[tuple[str, str, str], float] = {}
        for family in self._collected().collect():
            for s in family.samples:
                if "model" in s.labels:
                    key = (s.name, s.labels["model"], s.labels.get("version", ""))
                    values[key] = values.get(key, 0.0) + s.value
        return values

    def _collected(self) -> CollectorRegistry:
        self.refresh()
        if not self.multiprocess:
            return self.registry
        # A fresh registry per scrape, as prometheus_client documents for multiprocess mode.
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return merged


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each value, with one increment per bucket hit and one for the sum.

    Why: a batch's requests mostly share a bucket, and each increment costs ~0.75 us (~1.5 us with
    --workers N, where it takes a lock, calls getpid() and writes an mmap): per request, that was
    ~1% of what a small model's throughput allows. Uses the histogram's bucket attributes (as in
    prometheus_client 0.26, checked by a test against observe()); falls back to observe() if they
    are ever gone.
    """
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum  # type: ignore[attr-defined]
    except AttributeError:
        for v in values:
            histogram.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)  # the first bound >= v, as observe() picks
        counts[i] = counts.get(i, 0) + 1
    for i, n in counts.items():
        buckets[i].inc(n)
    total.inc(sum(values))


class ModelMetrics(BatchObserver):
    """The metric children of one model version, looked up once (the hot path only increments)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._m = metrics
        self.labels = (model, version)
        self._success = metrics.success.labels(model, version)
        self._count = metrics.count.labels(model, version)
        self._exec = metrics.exec_count.labels(model, version)
        self._queue = metrics.queue_us.labels(model, version)
        self._compute = metrics.compute_us.labels(model, version)
        self._batch = metrics.batch_size.labels(model, version)
        self._cache = metrics.cache_hits.labels(model, version)
        self._request_compute = metrics.request_compute_us.labels(model, version)
        self._last = metrics.last_inference_ms.labels(model, version)
        self._input_elements = metrics.input_elements.labels(model, version)
        self._padded_elements = metrics.padded_input_elements.labels(model, version)
        self._padding_ratio = metrics.padding_ratio.labels(model, version)
        self._providers: list[str] = []
        #: The model's drift monitor (cloud/monitor.py), set once it is attached; None: off.
        self.monitor: Any = None

    def attach(self, pending: Callable[[], float], providers: Sequence[str], instances: int) -> None:
        """Publish the live pending count and the instances per provider really in use."""
        if self._m.multiprocess:
            self._m._pending_sources[self.labels] = pending
            self._m.pending.labels(*self.labels).set(pending())
        else:
            self._m.pending.labels(*self.labels).set_function(pending)
        self._providers = list(providers)
        # A session lists its providers in preference order; the first is the one doing the work.
        self._m.instances.labels(*self.labels, providers[0] if providers else "unknown").set(instances)

    def detach(self) -> None:
        """Remove the gauges of an unloaded version (counters keep their history)."""
        if self._m.multiprocess:
            # Removing a child leaves its value in this worker's file: zero it first.
            self._m._pending_sources.pop(self.labels, None)
            self._m.pending.labels(*self.labels).set(0)
            for provider in self._providers[:1]:
                self._m.instances.labels(*self.labels, provider).set(0)
            return  # prometheus_client cannot remove labels in multiprocess mode (and warns)
        for provider in self._providers[:1]:
            try:
                self._m.instances.remove(*self.labels, provider)
            except KeyError:
                pass
        try:
            self._m.pending.remove(*self.labels)
        except KeyError:
            pass

    def failure(self, reason: str) -> None:
        self._m.failure.labels(*self.labels, reason).inc()

    def cache_hit(self) -> None:
        self._cache.inc()
        self._success.inc()

    def on_batch(self, rows: int, requests: int, compute_us: float, queue_us: Sequence[float]) -> None:
        # Successes are counted here, once per batch, not per request on the event loop: the
        # loop's cost per request is what bounds a small model's throughput (see front.py).
        if requests:
            self._success.inc(requests)
        self._count.inc(rows)
        self._exec.inc()
        self._compute.observe(compute_us)
        self._request_compute.inc(compute_us * len(queue_us))
        self._batch.observe(rows)
        self._last.set(time.time() * 1e3)
        observe_all(self._queue, queue_us)

    def on_answered(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        monitor = self.monitor
        if monitor is not None:
            monitor.observe(inputs, outputs)

    def on_padding(self, sent: int, computed: int) -> None:
        self._input_elements.inc(sent)
        self._padded_elements.inc(computed)
        self._padding_ratio.observe(computed / sent if sent else 1.0)


def model_statistics(values: Mapping[tuple[str, str, str], float], model: str, version: str, cache: bool) -> dict[str, Any]:
    """One ``$model_stat`` of the v2 statistics extension (Triton's meaning), from :meth:`Metrics.snapshot`.

    What is measured: queue time per request, compute per request (the batch's time: stacking the
    inputs and the run, both in compute_infer, so compute_input/compute_output read 0), success =
    queue + compute (from queueing to outputs ready; a cache hit adds 0). Failures and cache hits
    are counted, not timed, and ``batch_stats`` is empty: the batch size distribution is the
    ``tandem_inference_batch_size`` histogram in /metrics.
    """

    def value(name: str) -> float:
        return values.get((name, model, version), 0.0)

    def stat(count: float, us: float = 0.0) -> dict[str, int]:
        return {"count": int(count), "ns": int(round(us * 1e3))}

    executed = value("tandem_inference_queue_duration_us_count")
    queue_us = value("tandem_inference_queue_duration_us_sum")
    compute_us = value("tandem_inference_request_compute_duration_us_total")
    return {
        "name": model,
        "version": version,
        "last_inference": int(value("tandem_inference_last_timestamp_ms")),
        "inference_count": int(value("tandem_inference_count_total")),
        "execution_count": int(value("tandem_inference_exec_count_total")),
        "inference_stats": {
            "success": stat(value("tandem_inference_request_success_total"), queue_us + compute_us),
            "fail": stat(value("tandem_inference_request_failure_total")),
            "queue": stat(executed, queue_us),
            "compute_input": stat(executed),
            "compute_infer": stat(executed, compute_us),
            "compute_output": stat(executed),
            "cache_hit": stat(value("tandem_response_cache_hits_total")),
            "cache_miss": stat(executed if cache else 0),
        },
        "batch_stats": [],
    }
