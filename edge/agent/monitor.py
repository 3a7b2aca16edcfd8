"""The agent's drift and live quality monitor: what this device's apps send, against the bundle's
reference profile (its edge variant's outputs).

Each routed call's inputs and answer are queued (bounded; a full queue drops and counts) and
profiled every ``interval_s`` in a worker thread, many rows at once, so the local API's event loop
only appends. A call the cascade escalated (the edge was unsure, the cloud answered) is compared
with the edge's own answer, computed in the background by the same router with ``local_only``
(at most :data:`MAX_COMPARING` at a time), for the live edge-vs-cloud agreement. Labels arrive as
feedback records (``label`` and ``payload.prediction``, as the cloud reads them). The state is
written to ``<data_dir>/monitor.json`` (what ``tandem monitor <data_dir>`` reads) when it changed,
and uploaded through the outbox as a ``profile`` record every ``upload_interval_s`` (5 minutes)
when there is something new.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.shared.bundle import Bundle
from tandem.shared.profile import RunningProfile

from .config import AgentMonitoring
from .store import write_json_atomic

__all__ = ["MONITOR_FILE", "PROFILE_KIND", "AgentMonitor", "MonitoredRouter"]

log = logging.getLogger(__name__)

MONITOR_FILE = "monitor.json"
PROFILE_KIND = "profile"
#: Calls queued for profiling at most (beyond: dropped and counted).
MAX_QUEUED = 4096
#: Escalated calls whose edge answer is being computed at once, at most (beyond: not compared).
MAX_COMPARING = 4
_HISTORY = 720


def _argmax(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(len(a), -1).argmax(1)


class _Model:
    """One model version's running profile and live quality on this device."""

    def __init__(self, bundle: Bundle, settings: AgentMonitoring) -> None:
        m = bundle.manifest
        assert m.profile is not None
        self.name, self.version = m.name, m.version
        self.settings = settings
        self.profile = RunningProfile(m.profile, "edge", window=settings.window)
        self.outputs = sorted({f.tensor for f in self.profile.features if f.source == "output"})
        self.task_output = m.task.output or (m.outputs[0].name if m.outputs else None)
        self.classifier = m.task.kind == "classification"
        self.calibration = m.calibration
        self.validation = m.profile.validation
        self.queue: collections.deque[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = collections.deque()
        self.dropped = 0
        self.labelled: collections.deque[tuple[str, bool]] = collections.deque(maxlen=settings.quality_window)
        self.agreement: collections.deque[bool] = collections.deque(maxlen=settings.quality_window)
        self.tiers: collections.deque[str] = collections.deque(maxlen=settings.quality_window)
        # Cascade calls: (confidence >= threshold, threshold) for the keep share against calibration.
        self.kept: collections.deque[tuple[bool, float]] = collections.deque(maxlen=settings.quality_window)
        self.report: Any = None
        self.drifting_since: float | None = None
        #: Calls, comparisons and labels seen: the state changed since it was last written or sent.
        self.count = 0
        self.drained = self.written = self.uploaded = -1
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=_HISTORY)

    def score(self) -> Any:
        return self.profile.report(self.settings.threshold, self.settings.min_rows)

    def quality(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labelled": len(self.labelled), "escalations_compared": len(self.agreement),
                               "routed": len(self.tiers)}
        if self.labelled:
            out["accuracy"] = float(np.mean([ok for _, ok in self.labelled]))
            edge = [ok for tier, ok in self.labelled if tier == "edge"]
            out["edge_accuracy"] = float(np.mean(edge)) if edge else None
        if self.agreement:
            out["escalation_agreement"] = float(np.mean(self.agreement))
        if self.tiers:
            out["edge_share"] = float(np.mean([t == "edge" for t in self.tiers]))
        if self.kept and self.calibration is not None and self.calibration.points:
            threshold = self.kept[-1][1]
            point = min(self.calibration.points, key=lambda p: abs(p.threshold - threshold))
            out["cascade_keep_share"] = float(np.mean([k for k, _ in self.kept]))
            out["expected_edge_share"] = point.keep_share
            out["target"] = point.cascade_accuracy
            out["threshold"] = threshold
        return out

    def document(self, top: int = 10) -> dict[str, Any]:
        report = self.report or self.score()
        names = [f.name for f in report.features[:top]]
        return {
            "model": self.name, "version": self.version, "tier": "edge", "threshold": self.settings.threshold,
            "window": self.settings.window, "min_rows": self.settings.min_rows, "drifting": report.drifting, "drifting_since": self.drifting_since, "score": report.score,
            "mean_psi": report.mean_psi, "window_rows": report.rows, "input_quality": dict(self.profile.totals),
            "features": [f.as_dict() for f in report.features[:top]], "histograms": self.profile.histograms(names),
            "live_quality": self.quality(), "validation": self.validation.model_dump() if self.validation else None,
            "history": list(self.history),
            "overhead": {"queued": len(self.queue), "dropped": self.dropped, "profile_bytes": self.profile.nbytes},
            "failed": None,
        }


class AgentMonitor:
    """Every tracked model's monitor on this device. ``await run(stop)`` drives it."""

    def __init__(self, data_dir: Path, enqueue: Any, settings: AgentMonitoring | None = None) -> None:
        self.settings = settings or AgentMonitoring()
        self.path = Path(data_dir) / MONITOR_FILE
        self._enqueue = enqueue
        self.interval_s = self.settings.interval_s
        self.upload_interval_s = self.settings.upload_interval_s
        self.models: dict[str, _Model] = {}
        self._comparing: set[asyncio.Task[None]] = set()
        self._last_upload = time.monotonic()
        self._written_models: set[str] = set()

    def wrap(self, router: Any, bundle: Bundle) -> Any:
        """``router`` with its calls monitored (as is when the bundle has no reference profile)."""
        if bundle.manifest.profile is None or not self.settings.enabled:
            self.models.pop(bundle.name, None)
            return router
        try:
            self.models[bundle.name] = _Model(bundle, self.settings)
        except Exception as e:  # noqa: BLE001 - a profile this agent cannot use: serve unmonitored
            log.error("model %s:%s: no drift monitor: %s: %s", bundle.name, bundle.version, type(e).__name__, e)
            return router
        return MonitoredRouter(router, self)

    # --- on the loop: cheap -------------------------------------------------------------------

    def observe(self, router: Any, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], route: Mapping[str, Any]) -> None:
        m = self.models.get(router.name)
        if m is None or m.version != router.version:
            return
        m.count += 1
        tier = route.get("tier")
        if tier in ("edge", "cloud"):
            m.tiers.append(str(tier))
        conf, est = route.get("confidence"), route.get("estimates") or {}
        threshold = est.get("threshold") if isinstance(est, Mapping) else None
        if route.get("policy") == "cascade" and isinstance(conf, (int, float)) and isinstance(threshold, (int, float)) \
                and np.isfinite(threshold):
            m.kept.append((float(conf) >= float(threshold), float(threshold)))
        if tier != "edge":
            # The profile compares the edge variant's outputs: a cloud answer is profiled by its inputs only
            # after the edge's own answer is known (escalations), else not at all.
            if tier == "cloud" and conf is not None and len(self._comparing) < MAX_COMPARING and m.classifier:
                task = asyncio.get_running_loop().create_task(self._compare(router, m, dict(inputs), dict(outputs)))
                self._comparing.add(task)
                task.add_done_callback(self._comparing.discard)
            return
        if len(m.queue) >= MAX_QUEUED:
            m.dropped += 1
            return
        m.queue.append((dict(inputs), {k: outputs[k] for k in m.outputs if k in outputs}))

    async def _compare(self, router: Any, m: _Model, inputs: dict[str, np.ndarray], cloud: dict[str, np.ndarray]) -> None:
        try:
            edge, _ = await router.inner.infer(inputs, {"local_only": True})
        except Exception as e:  # noqa: BLE001 - a comparison is best effort
            log.debug("edge comparison failed: %s", e)
            return
        m.count += 1
        out = m.task_output
        if out in edge and out in cloud:
            m.agreement.extend((_argmax(edge[out]) == _argmax(cloud[out])).tolist())
        if len(m.queue) < MAX_QUEUED:
            m.queue.append((inputs, {k: edge[k] for k in m.outputs if k in edge}))

    def on_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Feedback passing through the outbox: labels with the prediction they judge."""
        for r in records:
            if r.get("kind") != "feedback" or r.get("label") is None:
                continue
            m = self.models.get(str(r.get("model")))
            payload = r.get("payload") or {}
            if m is None or not isinstance(payload, Mapping) or "prediction" not in payload:
                continue
            m.labelled.append((str(payload.get("tier") or "edge"), str(payload["prediction"]) == str(r["label"])))
            m.count += 1

    # --- periodic: in a thread -----------------------------------------------------------------

    def _drain(self) -> None:
        for m in list(self.models.values()):
            if m.count == m.drained and m.report is not None:
                continue  # nothing new: no rescore, no history point
            m.drained = m.count
            batch = []
            while m.queue:
                batch.append(m.queue.popleft())
            if batch:
                groups: dict[Any, list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]] = {}
                for x, y in batch:
                    key = tuple((k, v.shape[1:], v.dtype.str) for k, v in x.items())
                    groups.setdefault(key, []).append((x, y))
                for rows in groups.values():
                    inputs = {k: np.concatenate([x[k] for x, _ in rows]) for k in rows[0][0]}
                    outputs = {k: np.concatenate([y[k] for _, y in rows]) for k in m.outputs}
                    m.profile.observe(inputs, outputs)
            m.report = m.score()
            if m.report.drifting and m.drifting_since is None:
                m.drifting_since = time.time()
            elif not m.report.drifting:
                m.drifting_since = None
            q = m.quality()
            m.history.append({"t": time.time(), "rows": m.profile.totals["rows"], "score": m.report.score,
                              **{k: v for k, v in q.items() if isinstance(v, float)}})

    def document(self) -> dict[str, Any]:
        return {"updated_at": time.time(), "models": {name: m.document() for name, m in self.models.items()}}

    async def tick(self) -> None:
        await asyncio.to_thread(self._drain)
        # Written only when something changed: a device's flash should not be rewritten (with
        # fsyncs) every interval while nothing happens.
        models = set(self.models)
        if models != self._written_models or any(m.written != m.count for m in self.models.values()):
            doc = self.document()
            await asyncio.to_thread(write_json_atomic, self.path, doc)
            self._written_models = models
            for m in self.models.values():
                m.written = m.count
        if time.monotonic() - self._last_upload >= self.upload_interval_s:
            await self.upload()

    async def upload(self) -> None:
        """One ``profile`` record per monitored model into the outbox (the uploader sends it)."""
        self._last_upload = time.monotonic()
        records = []
        for m in self.models.values():
            if m.uploaded == m.count:
                continue  # nothing new since the last report sent
            m.uploaded = m.count
            report = m.report or m.score()
            records.append({"kind": PROFILE_KIND, "model": m.name, "version": m.version, "payload": {
                "score": report.score, "drifting": report.drifting, "threshold": m.settings.threshold,
                "top": [{"name": f.name, "psi": f.psi} for f in report.features[:5]],
                "live_quality": m.quality(), "state": m.profile.state(),
            }})
        if records:
            await self._enqueue(records)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
                break
            except TimeoutError:
                pass
            try:
                await self.tick()
            except Exception:
                log.exception("agent drift monitor interval failed")

    async def close(self) -> None:
        for t in list(self._comparing):
            t.cancel()
        await asyncio.gather(*self._comparing, return_exceptions=True)


class MonitoredRouter:
    """A router whose calls the :class:`AgentMonitor` sees (same interface as routing.Router)."""

    def __init__(self, inner: Any, monitor: AgentMonitor) -> None:
        self.inner = inner
        self.name = inner.name
        self.version = inner.version
        self._monitor = monitor

    async def infer(self, inputs: Mapping[str, np.ndarray], budget: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        outputs, route = await self.inner.infer(inputs, budget)
        try:
            self._monitor.observe(self, inputs, outputs, route)
        except Exception:
            log.exception("agent drift monitor failed to observe a call")
        return outputs, route

    async def aclose(self) -> None:
        await self.inner.aclose()
