"""Data drift and live quality of every served model, in the cloud tier.

Per loaded model version with a reference profile in its bundle (``Manifest.profile``), a
:class:`ModelMonitor` keeps a :class:`~tandem.shared.profile.RunningProfile` of what the cloud
variant serves: the instance thread hands it each batch's inputs and outputs right after the
answers leave for the event loop (:meth:`BatchObserver.on_answered`), and it profiles at most
``monitoring.rows_per_batch`` rows of them, vectorised, skipping whole batches whenever its time
would exceed ``monitoring.max_cpu_share`` of one core. Memory per model is the running profile's
fixed count arrays (``RunningProfile.nbytes``); no input is kept.

Every ``monitoring.interval_s`` the app's :class:`Monitoring` task attaches monitors to newly
loaded versions, recomputes the scores, sets the Prometheus gauges, reads new feedback records
(labels, and agents' route records of escalated calls, for the live quality) and calls
``monitoring.webhook_url`` when a model starts or stops drifting (bounded attempts, never on the
loop's time). ``GET /v1/monitor/{model}[/versions/{version}]`` answers the whole picture as JSON
(``?top=`` features, 10 by default), ``GET /v1/monitor`` lists the models and their scores.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from tandem.shared.errors import NotFound
from tandem.shared.profile import DriftReport, RunningProfile

from .config import MonitoringConfig

__all__ = ["MONITORING_KEY", "MONITOR_PATH", "LiveQuality", "ModelMonitor", "Monitoring"]

_log = logging.getLogger("tandem.cloud.monitor")

#: Not under /v1/models/, whose errors are the native protocol's msgpack: this endpoint is JSON.
MONITOR_PATH = "/v1/monitor/{model}"
#: Feedback records read per interval (the rest wait for the next one).
_FEEDBACK_BATCH = 1000
#: Rows a cloud monitor gathers from successive batches before one profile update.
FLUSH_ROWS = 64
#: Quality-over-time points kept per model (one per interval in which something changed).
_HISTORY = 720


class LiveQuality:
    """Rolling quality from labelled answers and from escalations both tiers answered (bounded)."""

    def __init__(self, window: int, calibration: Any = None) -> None:
        self.labelled: collections.deque[tuple[str, bool]] = collections.deque(maxlen=window)
        self.escalations: collections.deque[bool] = collections.deque(maxlen=window)
        self.tiers: collections.deque[str] = collections.deque(maxlen=window)
        # Cascade calls: (edge confidence >= the threshold used, that threshold).
        self.kept: collections.deque[tuple[bool, float]] = collections.deque(maxlen=window)
        self.calibration = calibration
        #: Records taken in all (the deques stop growing once full).
        self.count = 0

    def add_label(self, tier: str, correct: bool) -> None:
        self.count += 1
        self.labelled.append((tier, correct))

    def add_route(self, tier: str | None, agrees: bool | None, confidence: Any = None, threshold: Any = None) -> None:
        """One routed call: where it ran, whether the edge agreed with the cloud (when a client
        compared them), and for the cascade the edge confidence and the threshold it was held to."""
        self.count += 1
        if tier in ("edge", "cloud"):
            self.tiers.append(tier)
        if agrees is not None:
            self.escalations.append(bool(agrees))
        if _number(confidence) and _number(threshold):
            self.kept.append((float(confidence) >= float(threshold), float(threshold)))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labelled": len(self.labelled), "escalations_compared": len(self.escalations),
                               "routed": len(self.tiers)}
        if self.labelled:
            out["accuracy"] = float(np.mean([ok for _, ok in self.labelled]))
            edge = [ok for tier, ok in self.labelled if tier == "edge"]
            out["edge_accuracy"] = float(np.mean(edge)) if edge else None
        if self.escalations:
            out["escalation_agreement"] = float(np.mean(self.escalations))
        if self.tiers:
            out["edge_share"] = float(np.mean([t == "edge" for t in self.tiers]))
        points = self.calibration.points if self.calibration is not None else []
        if self.kept and points:
            # What the cascade keeps on the edge now, against what calibration promised at the
            # threshold in use, and the cascade accuracy that promise came with.
            threshold = self.kept[-1][1]
            point = min(points, key=lambda p: abs(p.threshold - threshold))
            out["cascade_keep_share"] = float(np.mean([k for k, _ in self.kept]))
            out["expected_edge_share"] = point.keep_share
            out["target"] = point.cascade_accuracy
            out["threshold"] = threshold
        return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


class ModelMonitor:
    """The running profile of one model version and its scores."""

    def __init__(self, name: str, version: str, bundle: Any, config: MonitoringConfig) -> None:
        manifest = bundle.manifest
        assert manifest.profile is not None
        self.name, self.version = name, version
        self.config = config
        self.profile = RunningProfile(manifest.profile, "cloud", window=config.window)
        self._outputs = sorted({f.tensor for f in self.profile.features if f.source == "output"})
        self.calibration = manifest.calibration
        self.validation = manifest.profile.validation
        self.quality = LiveQuality(config.quality_window, manifest.calibration)
        #: The latest drift reports agents uploaded for this model (kind "profile"), newest last.
        self.edge_reports: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self.batches = 0
        self.skipped = 0
        self.failed: str | None = None
        self._spent = 0.0
        self._since = time.perf_counter()
        self._window, self._window_spent = self._since, 0.0
        # Rows taken from batches, profiled together once FLUSH_ROWS are here (or on a rescore):
        # numpy's cost per call, not per row, is most of a small update.
        self._pending: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]] = []
        self._pending_rows = 0
        self._plock = threading.Lock()
        self.report: DriftReport | None = None
        self._scored: tuple[int, ...] = ()
        self.drifting = False
        self.drifting_since: float | None = None
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=_HISTORY)

    # --- instance threads -------------------------------------------------------------------------

    def observe(self, inputs: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Profile (part of) one batch. Never raises: a monitor that fails turns itself off."""
        if self.failed is not None:
            return
        self.batches += 1
        # Within its share of one core (its threads' CPU time, not the wall time a thread spends
        # waiting for the GIL while the loop runs), counted per second: a batch that would exceed
        # it is skipped whole, and an idle second leaves no credit for a busy one.
        now = time.perf_counter()
        if now - self._window > 1.0:
            self._window, self._window_spent = now, 0.0
        if self._window_spent > self.config.max_cpu_share * (now - self._window):
            self.skipped += 1
            return
        t0 = time.thread_time()
        try:
            limit = self.config.rows_per_batch
            parts: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]] = []
            rows = 0
            for x, y in zip(inputs, outputs):
                if rows >= limit:
                    break
                n = len(next(iter(x.values())))
                if rows + n > limit:
                    x, y, n = {k: v[: limit - rows] for k, v in x.items()}, {k: y[k][: limit - rows] for k in self._outputs}, limit - rows
                parts.append((x, y, n))
                rows += n
            with self._plock:
                self._pending += parts
                self._pending_rows += rows
                full = self._pending_rows >= FLUSH_ROWS
                if full:
                    parts, self._pending, self._pending_rows = self._pending, [], 0
            if full:
                self._profile(parts)
        except Exception as e:  # noqa: BLE001 - monitoring must never break serving
            self.failed = f"{type(e).__name__}: {e}"
            _log.error("model %s:%s: drift monitor off: %s", self.name, self.version, self.failed)
        spent = time.thread_time() - t0
        self._spent += spent
        self._window_spent += spent

    def flush(self) -> None:
        """Profile the rows still waiting for a full :data:`FLUSH_ROWS` (any thread)."""
        with self._plock:
            parts, self._pending, self._pending_rows = self._pending, [], 0
        if parts and self.failed is None:
            try:
                self._profile(parts)
            except Exception as e:  # noqa: BLE001 - monitoring must never break serving
                self.failed = f"{type(e).__name__}: {e}"
                _log.error("model %s:%s: drift monitor off: %s", self.name, self.version, self.failed)

    def _profile(self, parts: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]]) -> None:
        """One vectorised update per input signature (requests of different lengths apart)."""
        groups: dict[tuple[Any, ...], list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]] = {}
        for x, y, _ in parts:
            groups.setdefault(tuple((k, v.shape[1:]) for k, v in x.items()), []).append((x, y))
        for group in groups.values():
            if len(group) == 1:
                x, y = group[0]
                self.profile.observe(x, {k: y[k] for k in self._outputs})
            else:
                self.profile.observe({k: np.concatenate([x[k] for x, _ in group]) for k in group[0][0]},
                                     {k: np.concatenate([y[k] for _, y in group]) for k in self._outputs})

    # --- the loop ---------------------------------------------------------------------------------

    def rescore(self) -> tuple[bool, bool]:
        """Recompute the scores; returns (drifting now, changed since the last rescore). Nothing
        to do when no row arrived since the last time (an idle model costs the loop nothing)."""
        self.flush()
        seen = (self.profile.totals["rows"], self.quality.count)
        if self.report is not None and seen == self._scored:
            return self.drifting, False
        self._scored = seen
        report = self.profile.report(self.config.threshold, self.config.min_rows)
        self.report = report
        changed = report.drifting != self.drifting
        if changed:
            self.drifting = report.drifting
            self.drifting_since = time.time() if report.drifting else None
        point = {"t": time.time(), "rows": self.profile.totals["rows"], "score": report.score,
                 **{k: v for k, v in self.quality.summary().items() if isinstance(v, float)}}
        if not self.history or self.history[-1]["rows"] != point["rows"] or len(self.quality.labelled):
            self.history.append(point)
        return report.drifting, changed

    def cpu_share(self) -> float:
        return self._spent / max(1e-9, time.perf_counter() - self._since)

    def snapshot(self, top: int = 10) -> dict[str, Any]:
        """What ``GET /v1/monitor/{model}`` answers (JSON-ready)."""
        report = self.report or self.profile.report(self.config.threshold, self.config.min_rows)
        top_names = [f.name for f in report.features[:top]]
        target = None
        if self.calibration is not None and self.calibration.points:
            best = max(p.cascade_accuracy for p in self.calibration.points)
            target = {"calibrated_cascade_accuracy_max": best, "metric": self.calibration.metric}
        return {
            "model": self.name,
            "version": self.version,
            "tier": "cloud",
            "threshold": self.config.threshold,
            "window": self.config.window,
            "min_rows": self.config.min_rows,
            "drifting": report.drifting,
            "drifting_since": self.drifting_since,
            "score": report.score,
            "mean_psi": report.mean_psi,
            "window_rows": report.rows,
            "input_quality": dict(self.profile.totals),
            "features": [f.as_dict() for f in report.features[:top]],
            "histograms": self.profile.histograms(top_names),
            "live_quality": self.quality.summary(),
            "validation": self.validation.model_dump() if self.validation else None,
            "calibration": target,
            "history": list(self.history),
            "edge_reports": list(self.edge_reports),
            "overhead": {"batches": self.batches, "skipped": self.skipped, "cpu_share": self.cpu_share(),
                         "rows_per_batch": self.config.rows_per_batch, "profile_bytes": self.profile.nbytes},
            "failed": self.failed,
        }


class Monitoring:
    """The app's monitors: attach, rescore, publish, read feedback, call the webhook."""

    def __init__(self, config: MonitoringConfig, repository: Any, metrics: Any, feedback: Any = None) -> None:
        self.config = config
        self.repository = repository
        self.metrics = metrics
        self.feedback = feedback
        self.monitors: dict[tuple[str, str], ModelMonitor] = {}
        self._shown: dict[tuple[str, str], set[str]] = {}
        self._after = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._webhooks: set[asyncio.Task[None]] = set()
        #: CPU seconds the intervals took on the event loop's thread (the monitors' own is per model).
        self.loop_cpu_s = 0.0
        self._since = time.perf_counter()
        #: Webhook calls made: (payload, final status or error), newest last (bounded).
        self.webhook_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)

    def add_routes(self, app: web.Application) -> None:
        app[MONITORING_KEY] = self
        app.router.add_get("/v1/monitor", self._list)
        app.router.add_get(MONITOR_PATH, self._handle)
        app.router.add_get(MONITOR_PATH + "/versions/{version}", self._handle)

    async def start(self) -> None:
        if not self.config.enabled:
            return
        self.attach()
        self._task = asyncio.create_task(self._run(), name="tandem-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in list(self._webhooks):
            t.cancel()
        await asyncio.gather(*self._webhooks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def attach(self) -> None:
        """A monitor for every loaded version that has a reference profile and none yet; forget
        the unloaded ones."""
        loaded = {(m.name, m.version): m for m in self.repository.loaded()}
        for key, served in loaded.items():
            if key in self.monitors or served.bundle.manifest.profile is None:
                continue
            try:
                monitor = ModelMonitor(served.name, served.version, served.bundle, self.config)
            except Exception as e:  # noqa: BLE001 - a profile this Tandem cannot use: serve unmonitored
                _log.error("model %s:%s: no drift monitor: %s: %s", served.name, served.version, type(e).__name__, e)
                continue
            self.monitors[key] = monitor
            served.metrics.monitor = monitor
        for key in [k for k in self.monitors if k not in loaded]:
            del self.monitors[key]
            self._unpublish(key)

    async def tick(self) -> None:
        """One interval's work (also called by tests and on every read)."""
        t0 = time.thread_time()
        try:
            await self._tick()
        finally:
            self.loop_cpu_s += time.thread_time() - t0

    async def _tick(self) -> None:
        self.attach()
        if self.feedback is not None:
            with contextlib.suppress(Exception):
                await self._read_feedback()
        for key, monitor in list(self.monitors.items()):
            self._rescore(key, monitor)

    def _rescore(self, key: tuple[str, str], monitor: ModelMonitor) -> None:
        drifting, changed = monitor.rescore()
        self._publish(key, monitor)
        if changed and self.config.webhook_url:
            self._notify(monitor, drifting)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the next interval tries again
                _log.exception("drift monitor interval failed")

    # --- exposure ---------------------------------------------------------------------------------

    def _publish(self, key: tuple[str, str], monitor: ModelMonitor) -> None:
        m = self.metrics
        report = monitor.report
        if report is None:
            return
        if report.score is not None:
            m.drift_score.labels(*key).set(report.score)
        m.drift_drifting.labels(*key).set(1.0 if report.drifting else 0.0)
        m.drift_rows.labels(*key).set(report.rows)
        for check, value in monitor.profile.totals.items():
            m.input_quality.labels(*key, check).set(value)
        top = {f.name: f.psi for f in report.features[: self.config.top_features]} if report.score is not None else {}
        shown = self._shown.setdefault(key, set())
        for name in shown - set(top):
            self._drop(m.drift_feature, (*key, name))
        for name, psi in top.items():
            m.drift_feature.labels(*key, name).set(psi)
        self._shown[key] = set(top)
        for measure, value in monitor.quality.summary().items():
            if isinstance(value, float):
                m.live_quality.labels(*key, measure).set(value)

    def _drop(self, gauge: Any, labels: tuple[str, ...]) -> None:
        """Remove one gauge child; with --workers N (prometheus_client cannot remove labels in
        multiprocess mode) zero it instead."""
        if self.metrics.multiprocess:
            gauge.labels(*labels).set(0)
            return
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)

    def _unpublish(self, key: tuple[str, str]) -> None:
        m = self.metrics
        for gauge in (m.drift_score, m.drift_drifting, m.drift_rows):
            self._drop(gauge, key)
        for name in self._shown.pop(key, set()):
            self._drop(m.drift_feature, (*key, name))

    def find(self, name: str, version: str | None) -> ModelMonitor:
        served = self.repository.get(name, version)  # NotFound for an unknown model or version
        monitor = self.monitors.get((served.name, served.version))
        if monitor is None:
            why = ("monitoring is off (monitoring.enabled)" if not self.config.enabled
                   else "its bundle has no reference profile (rebuild it with this Tandem)"
                   if served.bundle.manifest.profile is None else "its monitor is starting")
            raise NotFound(f"model {served.name} version {served.version} is not monitored: {why}")
        return monitor

    async def _list(self, request: web.Request) -> web.Response:
        """Every monitored model version with its summary, and those served without a monitor."""
        self.attach()
        rows = []
        for m in self.repository.loaded():
            monitor = self.monitors.get((m.name, m.version))
            report = monitor.report if monitor is not None else None
            rows.append({"model": m.name, "version": m.version, "monitored": monitor is not None,
                         "score": report.score if report else None, "drifting": bool(report and report.drifting),
                         "window_rows": report.rows if report else 0})
        return web.json_response({"enabled": self.config.enabled, "threshold": self.config.threshold, "models": rows})

    async def _handle(self, request: web.Request) -> web.Response:
        top = request.query.get("top", "10")
        if not top.isdigit() or not 1 <= int(top) <= 100:
            from tandem.shared.errors import InvalidInput

            raise InvalidInput(f"'top' must be an integer from 1 to 100, got {top[:20]!r}")
        monitor = self.find(request.match_info["model"], request.match_info.get("version"))
        self._rescore((monitor.name, monitor.version), monitor)
        doc = monitor.snapshot(int(top))
        # The intervals' share of the loop's thread (all models together; the feedback read's
        # SQLite work runs on the store's own thread and is not in it).
        doc["overhead"]["loop_cpu_share"] = self.loop_cpu_s / max(1e-9, time.perf_counter() - self._since)
        return web.json_response(doc)

    # --- live quality -----------------------------------------------------------------------------

    async def _read_feedback(self) -> None:
        """Labels (kind "feedback": ``label`` and ``payload.prediction``, ``payload.tier``), route
        records (``payload.tier``; ``payload.edge_agrees`` when a client compared the edge's answer
        with the cloud's) and agents' drift reports (kind "profile") since the last read."""
        records = await self.feedback.query(after=self._after, limit=_FEEDBACK_BATCH)
        for r in records:
            self._after = max(self._after, int(r.get("seq") or 0))
            name, version = r.get("model"), r.get("version")
            monitors = [m for (n, v), m in self.monitors.items() if n == name and (version is None or v == version)]
            if not monitors:
                continue
            payload = r.get("payload") or {}
            if not isinstance(payload, dict):
                continue
            for m in monitors[:1]:
                if r.get("kind") == "feedback" and "prediction" in payload and r.get("label") is not None:
                    m.quality.add_label(str(payload.get("tier") or "cloud"), str(payload["prediction"]) == str(r["label"]))
                elif r.get("kind") == "profile":
                    m.edge_reports.append({k: payload.get(k) for k in ("score", "drifting", "threshold", "top", "live_quality")}
                                          | {"version": version, "created_at": r.get("created_at")})
                elif r.get("kind") == "route":
                    agrees = payload.get("edge_agrees")
                    estimates = payload.get("estimates")
                    threshold = estimates.get("threshold") if isinstance(estimates, dict) and payload.get("policy") == "cascade" else None
                    m.quality.add_route(payload.get("tier"), agrees if isinstance(agrees, bool) else None,
                                        payload.get("confidence"), threshold)

    # --- webhook ----------------------------------------------------------------------------------

    def _notify(self, monitor: ModelMonitor, drifting: bool) -> None:
        report = monitor.report
        payload = {
            "event": "drift_started" if drifting else "drift_stopped",
            "model": monitor.name, "version": monitor.version, "tier": "cloud",
            "score": report.score if report else None, "threshold": self.config.threshold,
            "top_features": [f.as_dict() for f in (report.features[:5] if report else [])],
            "at": time.time(),
        }
        task = asyncio.get_running_loop().create_task(self._post(payload))
        self._webhooks.add(task)
        task.add_done_callback(self._webhooks.discard)

    async def _post(self, payload: dict[str, Any]) -> None:
        assert self.config.webhook_url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout_s))
        outcome: Any = None
        for attempt in range(self.config.webhook_attempts):
            try:
                async with self._session.post(self.config.webhook_url, json=payload) as resp:
                    outcome = resp.status
                    if resp.status < 500 and resp.status != 429:
                        break
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                outcome = f"{type(e).__name__}: {e}"
            if attempt + 1 < self.config.webhook_attempts:
                await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
        self.webhook_log.append({"payload": payload, "outcome": outcome})
        if not (isinstance(outcome, int) and outcome < 300):
            _log.warning("drift webhook for %s:%s gave %s", payload["model"], payload["version"], outcome)


#: The app's :class:`Monitoring` (``app[MONITORING_KEY]``).
MONITORING_KEY = web.AppKey("tandem_monitoring", Monitoring)
