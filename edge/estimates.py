"""What the router knows, kept online: latency distributions, cloud state, cost and quality.

Percentiles come from a bounded buffer of recent samples whose sorted copy is refreshed lazily
(see :class:`LatencyWindow`), so recording a sample is O(1) and reading an estimate on the decision
path is usually a list index, not a sort. The edge profile is per batch size and seeded from the manifest's measurements until real
calls have replaced them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from tandem.shared.bundle import Bundle, Calibration, Manifest, VariantMetrics

__all__ = ["Estimates", "LatencyWindow", "confidence_source", "no_confidence_message", "robust_threshold"]

#: Below this many real samples, a seeded window answers from its seed.
MIN_SAMPLES = 8

#: The default cascade may lose at most this much accuracy against the reference variant (0.3 pt).
DEFAULT_MAX_LOSS = 0.003
#: One-sided 95% normal quantile, for the bound on that loss.
_Z95 = 1.6449


class LatencyWindow:
    """Moving percentiles (ms) over the last ``size`` samples, optionally only those younger than
    ``max_age_s`` — so that the estimate of a tier the router stopped using (because it looked slow)
    expires and the next call measures it again, instead of the router trusting a stale number forever.

    ``add(ms)`` records a sample. Without ``max_age_s`` it is the bound ``append`` of a bounded deque
    (a C call, no Python frame): the edge records every call, and on a 5 µs model a Python-level
    add was a visible share of it. The sorted copy is refreshed when read: while the window fills,
    once 1/16 of it is new; once full, when older than ``REFRESH_S`` (a full deque cannot tell how
    many samples it has taken since, and 20 sorts a second of 512 floats cost nothing).
    """

    __slots__ = ("add", "_buf", "_times", "_size", "_i", "_n", "_since_sort", "_sorted", "_sorted_n", "_sorted_at", "_seed", "_max_age")

    #: A full window's sorted copy is at most this old (s) when read.
    REFRESH_S = 0.05

    def __init__(self, size: int = 512, seed: tuple[float, float] | None = None, max_age_s: float | None = None) -> None:
        self._size = size
        self._max_age = max_age_s
        #: (p50, p99) from elsewhere (the manifest), used until MIN_SAMPLES real samples exist.
        self._seed = seed
        self._sorted: list[float] = []
        self._sorted_n = 0
        self._sorted_at = 0.0
        self._since_sort = 0
        if max_age_s is None:
            self._buf: Any = deque(maxlen=size)
            self._times: list[float] = []
            self.add: Callable[[float], None] = self._buf.append
        else:
            self._buf = [0.0] * size
            self._times = [0.0] * size
            self._i = 0
            self._n = 0
            self.add = self._add_timed

    def _add_timed(self, ms: float) -> None:
        i = self._i
        self._buf[i] = ms
        self._times[i] = time.monotonic()
        self._i = (i + 1) % self._size
        if self._n < self._size:
            self._n += 1
        self._since_sort += 1

    @property
    def count(self) -> int:
        return len(self._buf) if self._max_age is None else self._n

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0..1) of recent samples, the seed's estimate, or None if nothing is known."""
        now = time.monotonic()
        if self._max_age is not None:
            n = self._n
            # Re-sorted after 1/16 of the window changed (or 1 s passed), so that reading an
            # estimate on the decision path is usually a list index, not a sort.
            if now - self._sorted_at > 1.0 or self._since_sort >= max(1, n >> 4):
                horizon = now - self._max_age
                self._sorted = sorted(v for v, t in zip(self._buf[:n], self._times[:n]) if t >= horizon)
                self._since_sort = 0
                self._sorted_at = now
            n = len(self._sorted)
        else:
            buf = self._buf
            n = len(buf)
            grown = n - self._sorted_n
            if (grown and (grown >= n >> 4 or self._sorted_n < MIN_SAMPLES)) or (n == self._size and now - self._sorted_at > self.REFRESH_S):
                self._sorted = sorted(buf)
                self._sorted_n, self._sorted_at = n, now
        if n < MIN_SAMPLES:
            if self._seed is not None:
                p50, p99 = self._seed
                return p50 if q <= 0.5 else p50 + (p99 - p50) * min(1.0, (q - 0.5) / 0.49)
            if n == 0:
                return None
        s = self._sorted
        return s[min(len(s) - 1, int(q * len(s)))]


class Estimates:
    """The router's view of both tiers. Policies read it; the client feeds it."""

    def __init__(self, bundle: Bundle, *, window: int = 512, cost_per_call: float = 0.0, cloud_max_age_s: float | None = 30.0) -> None:
        m = bundle.manifest
        self._window = window
        edge = _variant(bundle, "edge")
        cloud = _variant(bundle, "cloud")
        em = edge.metrics if edge is not None else None
        #: batch size -> LatencyWindow of edge run times.
        self.edge: dict[int, LatencyWindow] = {}
        self._edge_seed = (em.latency_p50_ms, em.latency_p99_ms, em.latency_batch_size) if em else None
        self.cloud_rtt = LatencyWindow(window, max_age_s=cloud_max_age_s)
        self.cloud_queue = LatencyWindow(window, max_age_s=cloud_max_age_s)
        self.cloud_queue_depth: int | None = None
        self.last_cloud_at = 0.0
        self.cost_per_call = float(cost_per_call)
        self.cost_source = "config"
        #: The task's quality metric (``Task.metric``, higher is better) and each tier's measure of
        #: it; the names say "accuracy" because that is what a classifier's metric is.
        self.quality_metric = m.task.metric
        self.edge_accuracy: float | None = _quality(em)
        self.cloud_accuracy: float | None = _quality(cloud.metrics if cloud is not None else None)
        self._manifest = m
        self._thresholds: dict[tuple[float | None, float], tuple[float, str]] = {}
        #: The calibration the cascade's thresholds come from: None when the bundle has none, or when
        #: it was measured for another confidence than the one in use (``uncalibrated_why`` says).
        self.calibration: Calibration | None = m.calibration
        self.uncalibrated_why = "the bundle has no calibration"
        #: How the edge scores its answers here (``max_softmax``, ``margin``, ``head`` or ``custom``
        #: for the application's function), or None when it cannot (``no_confidence`` says why).
        self.confidence_kind: str | None = None
        self.no_confidence: str | None = None
        self.use_confidence(*confidence_source(m, [o.name for o in m.outputs]))

    def use_confidence(self, kind: str | None, why: str) -> None:
        """Record the confidence the edge scores its answers with (None: none, and ``why`` not).

        The calibration's thresholds hold only for the confidence it was measured with; another one
        (an application's function over a bundle calibrated for max-softmax) gets the configured
        threshold instead.
        """
        self.confidence_kind = kind
        self.no_confidence = why if kind is None else None
        cal = self._manifest.calibration
        self.calibration, self.uncalibrated_why = cal, "the bundle has no calibration"
        if cal is not None and kind is not None and not _same_confidence(cal.confidence, kind):
            self.calibration = None
            self.uncalibrated_why = f"the bundle is calibrated for its {cal.confidence} confidence, not for {why}"
        self._thresholds.clear()

    # --- edge ---------------------------------------------------------------------------------

    def edge_window(self, batch: int) -> LatencyWindow:
        w = self.edge.get(batch)
        if w is None:
            seed = None
            if self._edge_seed is not None:
                p50, p99, b = self._edge_seed
                scale = max(1.0, batch / max(1, b))  # a rough prior; real calls replace it
                seed = (p50 * scale, p99 * scale)
            w = self.edge[batch] = LatencyWindow(self._window, seed)
        return w

    def edge_ms(self, q: float, batch: int = 1) -> float | None:
        return self.edge_window(batch).percentile(q)

    # --- cloud --------------------------------------------------------------------------------

    def cloud_ms(self, q: float) -> float | None:
        return self.cloud_rtt.percentile(q)

    def cloud_probe_due(self, interval_s: float) -> bool:
        """True (and claims the probe) when the cloud has not been measured for ``interval_s``: a
        call the latency estimate would keep off the cloud goes anyway, so that an estimate made
        during a bad moment is refreshed rather than trusted until it ages out."""
        now = time.monotonic()
        if now - self.last_cloud_at < interval_s:
            return False
        self.last_cloud_at = now
        return True

    def observe_cloud(self, rtt_ms: float, queue_us: float | None, queue_depth: int | None, cost: float | None) -> None:
        self.last_cloud_at = time.monotonic()
        self.cloud_rtt.add(rtt_ms)
        if queue_us is not None:
            self.cloud_queue.add(queue_us / 1000.0)
        if queue_depth is not None:
            self.cloud_queue_depth = queue_depth
        if cost is not None and cost >= 0:
            self.cost_per_call = cost
            self.cost_source = "server"

    # --- quality ------------------------------------------------------------------------------

    def default_target(self, drop: float = 0.0) -> float | None:
        """The best calibrated cascade accuracy minus ``drop`` (what sending every unsure input to
        the cloud achieved on validation), or None without a calibration."""
        if self.calibration is None or not self.calibration.points:
            return None
        return max(p.cascade_accuracy for p in self.calibration.points) - drop

    def cascade_threshold(self, target_accuracy: float | None, fallback: float, max_loss: float = DEFAULT_MAX_LOSS) -> float:
        """The cascade's confidence threshold; see :meth:`cascade_choice`."""
        return self.cascade_choice(target_accuracy, fallback, max_loss)[0]

    def cascade_choice(self, target_accuracy: float | None, fallback: float, max_loss: float = DEFAULT_MAX_LOSS) -> tuple[float, str]:
        """(threshold, why) for the cascade, from the bundle's calibration (cached).

        With ``target_accuracy``: the threshold keeping the most inputs on the edge whose validation
        cascade accuracy meets it (a target no point reaches escalates everything). Without (the
        default): :func:`robust_threshold` — the most kept inputs whose accuracy loss against the
        reference is at most ``max_loss`` with 95% confidence. ``fallback`` when there is no
        calibration.
        """
        key = (target_accuracy, max_loss)
        got = self._thresholds.get(key)
        if got is None:
            cal = self.calibration
            if cal is None or not cal.points:
                why = self.uncalibrated_why if cal is None else "the bundle's calibration has no points"
                got = (fallback, f"fixed fallback {fallback:g} ({why})")
            elif target_accuracy is not None:
                point = cal.threshold_for(target_accuracy - 1e-12)
                measure = _verdict_share(cal)
                if point is None:
                    got = (float("inf"), f"no calibrated threshold reaches {measure} {target_accuracy:.4f}: escalate all")
                else:
                    got = (point.threshold, f"calibrated for {measure} {target_accuracy:.4f}: {cal.split} cascade "
                           f"{point.cascade_accuracy:.4f}, {point.keep_share:.1%} kept on the edge")
            else:
                got = robust_threshold(cal, max_loss)
            self._thresholds[key] = got
        return got
    def snapshot(self, batch: int = 1) -> dict[str, Any]:
        """Every estimate as plain numbers (for logs, Route records of costlier decisions, debugging)."""
        return {
            "edge_p50_ms": self.edge_ms(0.5, batch),
            "edge_p99_ms": self.edge_ms(0.99, batch),
            "cloud_p50_ms": self.cloud_ms(0.5),
            "cloud_p95_ms": self.cloud_ms(0.95),
            "cloud_queue_p50_ms": self.cloud_queue.percentile(0.5),
            "cloud_queue_depth": self.cloud_queue_depth,
            "cost_per_call": self.cost_per_call,
            "edge_accuracy": self.edge_accuracy,
            "cloud_accuracy": self.cloud_accuracy,
        }


def _variant(bundle: Bundle, role: str) -> Any:
    try:
        return bundle.variant(role)
    except KeyError:
        return None


def _quality(m: VariantMetrics | None) -> float | None:
    """A variant's measure of the task's metric (schema 1 manifests only have accuracy)."""
    if m is None:
        return None
    return m.quality if m.quality is not None else m.accuracy


def _same_confidence(calibrated: str, used: str) -> bool:
    # Margin and max-softmax come from the same scores; a run-time switch between them is the
    # operator's choice, so either keeps the calibration.
    softmax = ("max_softmax", "margin")
    return calibrated == used or (calibrated in softmax and used in softmax)


def _verdict_share(cal: Calibration) -> str:
    """What a calibration point's "accuracy" counts, for messages: ``accuracy`` or, for any other
    per-row verdict, e.g. ``cosine>=0.9 share``."""
    return "accuracy" if cal.metric == "accuracy" else f"{cal.metric} share"


def confidence_source(manifest: Manifest, output_names: Sequence[str], has_function: bool = False) -> tuple[str | None, str]:
    """(kind, what it is) of the confidence the edge can score its answers with, or (None, why not).

    An application's function (``has_function``) wins for any task. Otherwise the bundle's: a
    confidence head when its calibration has one, max-softmax (or margin) for a classifier. Any
    other task without a head has none: max-softmax over an embedding or a regression output
    measures nothing, so the cascade would escalate at random.
    """
    if has_function:
        return "custom", "the application's confidence function"
    cal = manifest.calibration
    task = manifest.task
    kind = cal.confidence if cal is not None else "max_softmax"
    if kind == "custom":
        return None, "the bundle's confidence is a function the application supplies ('custom') and none was passed"
    if kind == "head":
        head = cal.head if cal is not None else None
        if head is None:
            return None, "the bundle's calibration names a confidence head but holds none"
        if head.output not in output_names:
            return None, f"the confidence head reads output {head.output!r}, which the edge model does not have ({', '.join(output_names)})"
        return "head", f"the bundle's confidence head over {head.output!r}"
    if task.kind != "classification":
        has = "no calibration" if cal is None else "a calibration without a confidence head"
        return None, f"max-softmax is a classifier's confidence, and this {task.kind} bundle has {has}"
    return kind, f"{kind} over {task.output or 'the first output'}"


def no_confidence_message(why: str) -> str:
    """What a cascade refused for want of a confidence says: the reason and the ways out."""
    return (
        f"the cascade needs a confidence for the edge's answers and has none: {why}. Pass confidence=fn "
        "to HybridClient (a function of the edge outputs, a dict name -> array, returning a confidence "
        "per row), rebuild the bundle with a confidence head, or use another policy (edge-only, "
        "cloud-only, constrained or hedged)"
    )


def robust_threshold(cal: Calibration, max_loss: float = DEFAULT_MAX_LOSS, z: float = _Z95) -> tuple[float, str]:
    """The default cascade threshold: keep the most inputs on the edge such that, on the validation
    split, the cascade's accuracy loss against the reference variant is at most ``max_loss`` with
    one-sided 95% confidence. Returns (threshold, why).

    Why not "the most kept inputs whose validation cascade accuracy reaches the best one": that
    picks the first point where a noisy curve touches its maximum, and one validation input is
    ~0.3 pt on a few hundred, so it kept too much and lost ~0.6 pt on unseen data.

    Keeping the set K on the edge instead of escalating it loses (e − c) / n accuracy, with e edge
    and c reference errors among the kept inputs (both follow from the calibration points, whose
    kept sets are nested). Its per-input differences are −1, 0 or +1 and
    at most e + c of them are non-zero, so its standard error is at most √(e + c) / n, and the
    bound is (e − c + z·√(e + c)) / n. A point passes when the bound is ≤ ``max_loss``; ties keep
    the higher threshold. On a small split this effectively keeps only confidence levels where the
    edge made no error (or the reference made clearly more), which is what a few hundred inputs
    can vouch for; on a large split it allows the proportionate number.
    """
    n = cal.n
    rows = []
    for p in cal.points:
        kept = round(p.keep_share * n)
        edge_right = round((p.edge_accuracy_kept or 0.0) * kept)
        ref_wrong_escalated = (n - kept) - (round(p.cascade_accuracy * n) - edge_right)
        rows.append((p, kept, kept - edge_right, ref_wrong_escalated))
    # The escalated sets grow with the threshold; the strictest point's holds every reference
    # error when it escalates everything (else this undercounts c, which only makes us stricter).
    ref_wrong_all = max(r[3] for r in rows)
    best: tuple[int, float, int, int, float] | None = None
    for p, kept, e, ref_wrong_escalated in rows:
        c = max(0, ref_wrong_all - ref_wrong_escalated)
        bound = (e - c + z * math.sqrt(e + c)) / n
        if bound <= max_loss + 1e-12 and (best is None or (kept, p.threshold) > (best[0], best[1])):
            best = (kept, p.threshold, e, c, bound)
    measure = _verdict_share(cal)
    if best is None:
        return float("inf"), f"no calibrated threshold keeps the {measure} loss ≤ {max_loss * 100:.2f} pt (95% bound, n={n}): escalate all"
    kept, t, e, c, bound = best
    misses = "errors" if cal.metric == "accuracy" else f"rows failing {cal.metric}"
    return t, (
        f"calibrated: {kept / n:.1%} kept on the edge; on {n} {cal.split} inputs the kept ones had {e} edge and {c} "
        f"reference {misses}, {measure} loss ≤ {max(bound, 0.0) * 100:.2f} pt (95% bound) ≤ {max_loss * 100:.2f} pt"
    )
