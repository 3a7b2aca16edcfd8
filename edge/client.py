"""``HybridClient``: what an app embeds. One call in, outputs plus a :class:`Route` record out.

The client owns the edge runtime (always present, so it works with no cloud at all), the cloud
client (optional) and the router. Each call gets one deadline (``Budget.latency_ms`` or the config's
default) covering every attempt; the cloud is given the remaining time minus a reserve for the edge,
so a failing, slow or partitioned cloud is answered by the edge within the same deadline.

Sync and async: ``infer`` runs edge-only work (and the edge half of a cascade) inline on the calling
thread — no event loop, no thread hop, which keeps an edge call within a few µs of a raw
``session.run`` — and hands anything touching the network to a private event loop running in a
background daemon thread. ``ainfer`` runs on the caller's loop, with edge inference in a small
thread pool so the loop never blocks. Use one client from either side; each loop gets its own
connection pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.shared.bundle import Bundle, load_bundle
from tandem.shared.errors import DeadlineExceeded, InvalidInput, TandemError

from .budget import Budget
from .cloud_client import CloudClient, CloudReply
from .estimates import Estimates
from .jobs import JobClient, JobHandle
from .policies import Decision, Policy
from .router import Router, RouterConfig, is_retryable
from .runtime import ConfidenceFn, EdgeRuntime, run_error

__all__ = ["HybridClient", "Result", "Route"]

_log = logging.getLogger("tandem.edge.route")
_perf = time.perf_counter
_ndarray = np.ndarray
#: What _on_loop returns when the loop did not finish in time.
_LATE = object()
_LATE_WHY = "cloud leg not done by its time (client loop late)"
#: A sync caller stops waiting for the loop this long before the time it needs for the edge answer
#: (building the fallback Route and its own wake-up come out of it).
_GIVE_UP_S = 0.002
_FAST_BUDGETS = (Budget, type(None))


@dataclass(slots=True)
class Route:
    """Where a call ran and why."""

    tier: str  # "edge" | "cloud"
    reason: str
    policy: str
    latency_ms: float
    cost: float = 0.0
    confidence: float | None = None
    fallbacks: list[str] = field(default_factory=list)
    estimates: dict[str, Any] = field(default_factory=dict)
    hedged: bool = False
    model_version: str | None = None
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Result:
    outputs: dict[str, np.ndarray]
    route: Route


class HybridClient:
    """Run a bundle on the device and, when it pays, in the cloud — decided per call.

    ``bundle``: a loaded :class:`Bundle` or a bundle directory (only the edge variant's file needs to
    be present; it is verified against ``trusted_keys`` unless ``verify_signature=False``).
    ``cloud_url``: the ``tandem serve`` endpoint, or None for edge only. ``agent_url``/``agent_token``:
    the device agent's local API, where :meth:`submit` leaves a deferred job while the cloud is away. ``model``: the cloud's name
    for it (default: the bundle's). ``policy``: a policy name or object. ``config``: a
    :class:`RouterConfig` or a dict of its fields. ``confidence``: the cascade's confidence as a
    function of the edge outputs (:data:`~tandem.edge.runtime.ConfidenceFn`: a dict name → array in,
    a confidence per row or one number out), used instead of the bundle's.

    Calls take one array (a single-input model) or a dict name → array (any model, e.g. int64
    ``input_ids`` and ``attention_mask`` of any sequence length), on every policy.

    The cascade needs a confidence: max-softmax for a classifier, the bundle's confidence head, or
    ``confidence``. Without one, a client with a cloud raises
    :class:`~tandem.shared.errors.NoConfidence` here when the cascade is its policy, or at each call
    whose ``Budget.policy`` asks for it, rather than escalate every call.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        cloud_url: str | None = None,
        *,
        api_key: str | None = None,
        trusted_keys: Any = None,
        verify_signature: bool = True,
        model: str | None = None,
        policy: str | Policy = "cascade",
        config: RouterConfig | dict[str, Any] | None = None,
        confidence: ConfidenceFn | None = None,
        agent_url: str | None = None,
        agent_token: str | None = None,
    ) -> None:
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(Path(bundle), trusted_keys, verify_signature=verify_signature, variants=["edge"])
        if config is None:
            config = RouterConfig()
        elif isinstance(config, dict):
            try:
                config = RouterConfig(**config)
            except Exception as e:
                raise InvalidInput(f"bad router config: {e}") from None
        self.bundle = bundle
        self.config = config
        self.model = model or bundle.name
        self.estimates = Estimates(
            bundle,
            window=config.latency_window,
            cost_per_call=config.cloud_cost_per_call,
            cloud_max_age_s=config.cloud_estimate_max_age_s,
        )
        self.runtime = EdgeRuntime(
            bundle,
            providers=config.providers,
            intra_op_threads=config.intra_op_threads,
            warmup_runs=config.warmup_runs,
            estimates=self.estimates,
            confidence=confidence,
        )
        self.router = Router(config, self.estimates, policy, has_cloud=cloud_url is not None)
        self.cloud_url = cloud_url
        self._api_key = api_key
        if cloud_url is not None:
            CloudClient(cloud_url, self.model)  # validate the URL now, not on the first call
        # Deferrable jobs (submit/asubmit): the cloud's job API, else the device agent's outbox.
        self._jobs = JobClient(self.model, cloud_url=cloud_url, api_key=api_key, agent_url=agent_url,
                               agent_token=agent_token, loop=self._background_loop)
        self._out_names = self.runtime.output_names
        self._fast_dtype = self.runtime.fast_dtype
        self._first_input = self.runtime.input_names[0]
        self._session_run = self.runtime.session_run
        self._record_one = self.estimates.edge_window(1).add
        self._decide = self.router.decide
        self._confidence = self.runtime.scorer
        self._stats = self.router.stats
        #: Checked once: a logging call per edge call costs more than its level test.
        self._debug = _log.isEnabledFor(logging.DEBUG)
        self._single_output = self._out_names[0] if len(self._out_names) == 1 else None
        self._default_budget = Budget()
        self._edge_pool = _started_pool(config.edge_workers)
        self._clouds: dict[int, CloudClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # --- public API ---------------------------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        """Execution providers the edge session really uses."""
        return self.runtime.providers

    def infer(self, inputs: Any, budget: Budget | None = None) -> Result:
        """Run one call; blocks until it is answered or fails (never past its deadline + edge time)."""
        t0 = _perf()
        # The fast path, for the commonest call: one array of exactly the model's dtype (an identity
        # test on the dtype) and a Budget or none, planned to run here. A small edge model runs in
        # ~5 µs, so the generic checks, an extra method call, clock read or dict would each be a
        # visible share of it; the target is ≤ 1.1× a raw session.run (bench/route.py). Anything
        # else (dicts, other dtypes, bad input) takes the checked path in _begin with its clear
        # errors; a shape the model rejects is reported the same way on both paths.
        if inputs.__class__ is _ndarray and inputs.dtype is self._fast_dtype and budget.__class__ in _FAST_BUDGETS and not self._closed:
            b = self._default_budget if budget is None else budget
            d = self._decide(b)
            plan = d.plan
            if plan == "edge" or plan == "cascade":
                try:
                    outs = self._session_run(self._out_names, {self._first_input: inputs}, None)
                except Exception as e:
                    raise run_error(e) from None
                t1 = _perf()
                # The profile's sample runs from t0: the sub-µs of routing is paid by a fallback too.
                shape = inputs.shape
                if shape and shape[0] == 1:
                    self._record_one((t1 - t0) * 1000.0)
                else:
                    self.runtime.record(shape, (t1 - t0) * 1000.0)
                if plan == "edge":
                    return self._edge_result(outs, d, t0, t1)
                conf = self._confidence(outs)
                if conf >= d.threshold:  # type: ignore[operator]
                    return self._kept(outs, conf, d, t0, t1)
            feeds = {self._first_input: inputs}
        else:
            feeds, b, d = self._begin(inputs, budget)
            if d.plan == "edge":
                return self._edge_result(self.runtime.run(feeds), d, t0, _perf())
            if d.plan == "cascade":
                outs = self.runtime.run(feeds)
                conf = self._confidence(outs)
                if conf >= d.threshold:  # type: ignore[operator]
                    return self._kept(outs, conf, d, t0, _perf())
        # The network part runs on the background loop. This thread stops waiting for it just
        # before the time the edge answer needs (the loop's own timeout comes a margin earlier): on
        # a starved machine the loop thread can be scheduled tens of ms late, and the answer must
        # not wait for it. A fallback runs right here, saving two thread hand-offs.
        deadline = self._deadline(b, t0)
        if d.plan == "cascade":
            got = self._on_loop(self._escalate(feeds, outs, conf, b, d, t0), deadline - _GIVE_UP_S)
            if got is _LATE:
                head = f"cascade: edge confidence {conf:.2f} < {d.threshold:.2f}"
                return self._fallback_result(outs, f"{head}, {_LATE_WHY} → edge", d, t0, [_LATE_WHY], conf)
            return got  # type: ignore[no-any-return]
        give_up = deadline - self.router.edge_time_ms(_batch(feeds)) / 1000.0 - _GIVE_UP_S
        if d.plan == "hedged":
            got = self._on_loop(self._hedged(feeds, b, d, t0), give_up)
            if got is _LATE:
                return self._fallback_result(self.runtime.run(feeds), f"hedged: {_LATE_WHY} → edge", d, t0, [_LATE_WHY])
            return got  # type: ignore[no-any-return]
        fallbacks: list[str] = []
        got = self._on_loop(self._try_cloud(feeds, b, deadline, 0.0, fallbacks), give_up)
        if got is _LATE:
            fallbacks = [_LATE_WHY]
        elif got is not None:
            return self._cloud_result(got, d.reason, d, t0, fallbacks)
        return self._fallback_result(self.runtime.run(feeds), f"{fallbacks[-1]} → edge", d, t0, fallbacks)

    def _begin(self, inputs: Any, budget: Budget | None) -> tuple[Any, Budget, Any]:
        """Checks shared by infer() and ainfer(): (feeds, budget, decision)."""
        if self._closed:
            raise InvalidInput("client is closed")
        feeds = self.runtime.feeds(inputs)
        b = budget if budget is not None else self._default_budget
        if b.__class__ is not Budget and not isinstance(b, Budget):
            raise InvalidInput(f"budget must be a tandem.edge.Budget, got {type(budget).__name__}")
        return feeds, b, self.router.decide(b)

    def _on_loop(self, coro: Any, give_up_at: float) -> Any:
        """Run ``coro`` on the background loop and wait for it until ``give_up_at`` (perf_counter
        time); then cancel it and return ``_LATE``, so the caller answers from the edge in time."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise InvalidInput("infer() was called from the client's own loop thread (it would wait on itself): use ainfer()")
        future = asyncio.run_coroutine_threadsafe(_stamped(coro), self._background_loop())
        try:
            result, done_at = future.result(timeout=max(0.0, give_up_at - _perf()))
        except FutureTimeout:
            future.cancel()
            # At least this late: it counts towards the margin of the calls that follow.
            self.router.handoff_slip.add(self.router.margin_ms())
            return _LATE
        # How long the answer took to reach this thread: part of every deadline's margin.
        self.router.handoff_slip.add((_perf() - done_at) * 1000.0)
        return result

    def submit(self, inputs: Any, *, defer: bool = False, **job: Any) -> JobHandle:
        """Submit ``inputs`` as a cloud job and return its :class:`~tandem.edge.jobs.JobHandle`
        (``status()``, ``result()``). With ``defer=True``, a job the cloud cannot take now waits in
        the device agent's outbox (``agent_url``) and is submitted when the cloud returns. ``job``:
        ``version``, ``priority`` (0..9), ``callback`` (an http(s) URL), ``job_id`` (a UUID: the
        same id and inputs find the same job again). See :mod:`tandem.edge.jobs`."""
        feeds = self._job_feeds(inputs)
        return self._on_jobs_loop(self._jobs.asubmit(feeds, defer=defer, **job))

    async def asubmit(self, inputs: Any, *, defer: bool = False, **job: Any) -> JobHandle:
        """The async twin of :meth:`submit` (the handle's async methods are ``astatus``/``aresult``)."""
        return await self._jobs.asubmit(self._job_feeds(inputs), defer=defer, **job)

    def _job_feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        if self._closed:
            raise InvalidInput("client is closed")
        return self.runtime.feeds(inputs)

    def _on_jobs_loop(self, coro: Any) -> Any:
        if threading.current_thread() is self._thread:
            coro.close()
            raise InvalidInput("submit() was called from the client's own loop thread: use asubmit()")
        return asyncio.run_coroutine_threadsafe(coro, self._background_loop()).result()

    async def ainfer(self, inputs: Any, budget: Budget | None = None) -> Result:
        """The async twin of :meth:`infer`; edge inference runs in the client's thread pool."""
        t0 = _perf()
        feeds, b, d = self._begin(inputs, budget)
        if d.plan == "edge":
            outs = await self._edge_async(feeds)
            return self._edge_result(outs, d, t0, _perf())
        if d.plan == "cascade":
            outs = await self._edge_async(feeds)
            conf = self.runtime.confidence(outs)
            if conf >= d.threshold:  # type: ignore[operator]
                return self._kept(outs, conf, d, t0, _perf())
            return await self._escalate(feeds, outs, conf, b, d, t0)
        return await self._remote(feeds, b, d, t0)

    def close(self) -> None:
        """Release the connection pools, the background loop and the edge thread pool."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            cloud = self._clouds.pop(id(loop), None)
            if cloud is not None:
                asyncio.run_coroutine_threadsafe(cloud.close(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()
        self._edge_pool.shutdown(wait=False)

    async def aclose(self) -> None:
        cloud = self._clouds.pop(id(asyncio.get_running_loop()), None)
        if cloud is not None:
            await cloud.close()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> HybridClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> HybridClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # --- edge ---------------------------------------------------------------------------------

    def _edge_result(self, outs: list[np.ndarray], d: Decision, t0: float, t1: float) -> Result:
        route = Route("edge", d.reason, d.policy, (t1 - t0) * 1000.0, 0.0, None, [], d.estimates)
        if self._debug:
            _log.debug("route %s", route)
        if self._single_output is not None:
            return Result({self._single_output: outs[0]}, route)
        return Result(dict(zip(self._out_names, outs)), route)

    def _kept(self, outs: list[np.ndarray], conf: float, d: Decision, t0: float, t1: float) -> Result:
        route = Route("edge", f"cascade: edge confidence {conf:.2f} ≥ {d.threshold:.2f} → edge", d.policy, (t1 - t0) * 1000.0, 0.0, conf, [], d.estimates)
        self._stats["cascade: kept on edge"] += 1
        if self._debug:
            _log.debug("route %s", route)
        if self._single_output is not None:
            return Result({self._single_output: outs[0]}, route)
        return Result(dict(zip(self._out_names, outs)), route)

    async def _edge_async(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return await asyncio.get_running_loop().run_in_executor(self._edge_pool, self.runtime.run, feeds)

    # --- cloud --------------------------------------------------------------------------------

    def _cloud(self) -> CloudClient:
        key = id(asyncio.get_running_loop())
        c = self._clouds.get(key)
        if c is None:
            assert self.cloud_url is not None
            version = self.bundle.version if self.config.pin_version else None
            c = self._clouds[key] = CloudClient(
                self.cloud_url, self.model, version=version, api_key=self._api_key, pool_size=self.config.pool_size
            )
        return c

    def _deadline(self, budget: Budget, t0: float) -> float:
        ms = budget.latency_ms if budget.latency_ms is not None else self.config.default_deadline_ms
        return t0 + ms / 1000.0

    async def _try_cloud(
        self,
        feeds: dict[str, np.ndarray],
        budget: Budget,
        deadline: float,
        need_ms: float,
        fallbacks: list[str],
        *,
        have_edge_answer: bool = False,
    ) -> tuple[CloudReply, float] | None:
        """Cloud attempts within the deadline minus the time an edge fallback needs (none when the
        edge answer is already in hand): (reply, cost), or None with the reasons appended to
        ``fallbacks``. Cancelling it cancels the HTTP request."""
        router = self.router
        if have_edge_answer:
            reserve_ms = router.margin_ms()
        else:
            reserve_ms = router.edge_reserve_ms(_batch(feeds))
        request_id = uuid.uuid4().hex
        attempt = 0
        router.retries.enter()
        try:
            while True:
                left_ms = (deadline - _perf()) * 1000.0 - reserve_ms
                why = router.cloud_gate(budget, left_ms, need_ms if attempt == 0 else 0.0, retry=attempt > 0)
                if why is not None:
                    fallbacks.append(why)
                    return None
                due = _perf() + left_ms / 1000.0
                try:
                    reply = await self._cloud().infer(feeds, left_ms / 1000.0, request_id=request_id)
                except asyncio.CancelledError:
                    router.cloud_cancelled()
                    raise
                except TandemError as e:
                    if isinstance(e, DeadlineExceeded):  # how late our own timeout fired (and unwound)
                        router.timer_slip.add(max(0.0, (_perf() - due) * 1000.0))
                    router.cloud_failed(e)
                    fallbacks.append(f"cloud {e.code}: {e.message}")
                    if isinstance(e, InvalidInput) or not is_retryable(e) or attempt >= self.config.max_retries:
                        return None
                else:
                    t = reply.timing
                    cost = router.cloud_ok(reply.rtt_ms, t.queue_us, t.queue_depth, t.cost)
                    return reply, cost
                finally:
                    if attempt > 0:
                        router.retries.retry_done()
                attempt += 1
        finally:
            router.retries.leave()

    def _cloud_result(self, got: tuple[CloudReply, float], reason: str, d: Decision, t0: float, fallbacks: list[str], conf: float | None = None, hedged: bool = False) -> Result:
        reply, cost = got
        route = Route(
            "cloud", reason, d.policy, (_perf() - t0) * 1000.0, cost, conf, fallbacks, self._used(d), hedged,
            reply.model_version, reply.request_id,
        )
        self.router.stats[reason.split(":")[0] + " → cloud"] += 1
        _log.debug("route %s", route)
        return Result(reply.outputs, route)

    def _fallback_result(self, outs: list[np.ndarray], reason: str, d: Decision, t0: float, fallbacks: list[str], conf: float | None = None, hedged: bool = False) -> Result:
        route = Route("edge", reason, d.policy, (_perf() - t0) * 1000.0, 0.0, conf, fallbacks, self._used(d), hedged)
        self.router.stats[(fallbacks[-1] if fallbacks else reason).split(":")[0] + " → edge"] += 1
        _log.debug("route %s", route)
        return Result(dict(zip(self._out_names, outs)), route)

    def _used(self, d: Decision) -> dict[str, Any]:
        """What a call that considered the cloud went by: the policy's numbers plus the router's."""
        used = self.estimates.snapshot()
        used["edge_reserve_ms"] = self.router.edge_reserve_ms()
        used["breaker"] = self.router.breaker.state
        if self.router.spend is not None:
            used["spend_available"] = self.router.spend.available()
        used.update(d.estimates)
        return used

    async def _escalate(
        self, feeds: dict[str, np.ndarray], outs: list[np.ndarray], conf: float, budget: Budget, d: Decision, t0: float
    ) -> Result:
        """Cascade, edge unsure: the cloud if the remaining deadline allows, else the edge answer."""
        head = f"cascade: edge confidence {conf:.2f} < {d.threshold:.2f}"
        fallbacks: list[str] = []
        # The median, not the p95: with the edge answer in hand a late cloud costs only the wasted
        # call, and one slow moment must not stop every escalation.
        need = self.estimates.cloud_ms(0.5) or 0.0
        got = await self._try_cloud(feeds, budget, self._deadline(budget, t0), need, fallbacks, have_edge_answer=True)
        if got is not None:
            return self._cloud_result(got, f"{head} → cloud", d, t0, fallbacks, conf)
        return self._fallback_result(outs, f"{head}, {fallbacks[-1]} → edge", d, t0, fallbacks, conf)

    async def _remote(self, feeds: dict[str, np.ndarray], budget: Budget, d: Decision, t0: float) -> Result:
        if d.plan == "hedged":
            return await self._hedged(feeds, budget, d, t0)
        fallbacks: list[str] = []
        got = await self._try_cloud(feeds, budget, self._deadline(budget, t0), 0.0, fallbacks)
        if got is not None:
            return self._cloud_result(got, d.reason, d, t0, fallbacks)
        outs = await self._edge_async(feeds)
        return self._fallback_result(outs, f"{fallbacks[-1]} → edge", d, t0, fallbacks)

    async def _hedged(self, feeds: dict[str, np.ndarray], budget: Budget, d: Decision, t0: float) -> Result:
        deadline = self._deadline(budget, t0)
        fallbacks: list[str] = []
        cloud = asyncio.ensure_future(self._try_cloud(feeds, budget, deadline, 0.0, fallbacks))
        self.router.hedges.earn()
        try:
            reserve_s = self.router.edge_reserve_ms() / 1000.0
            wait_s = max(0.0, min((d.hedge_after_ms or 0.0) / 1000.0, deadline - reserve_s - _perf()))
            done, _ = await asyncio.wait({cloud}, timeout=wait_s)
            if not done and self.router.hedges.try_take():
                edge = asyncio.ensure_future(self._edge_async(feeds))
                racing: set[asyncio.Future[Any]] = {cloud, edge}
                first, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                if edge in first and not (cloud in first and cloud.result() is not None):
                    cloud.cancel()
                    fallbacks.append(f"cloud late (> {d.hedge_after_ms:.1f} ms), edge answered first")
                    return self._fallback_result(edge.result(), "hedged: cloud late → edge", d, t0, fallbacks, hedged=True)
                got = cloud.result()
                if got is not None:
                    return self._cloud_result(got, "hedged: cloud answered first → cloud", d, t0, fallbacks, hedged=True)
                return self._fallback_result(await edge, f"hedged: {fallbacks[-1]} → edge", d, t0, fallbacks, hedged=True)
            got = await cloud
            if got is not None:
                return self._cloud_result(got, "hedged: cloud → cloud", d, t0, fallbacks)
            outs = await self._edge_async(feeds)
            return self._fallback_result(outs, f"hedged: {fallbacks[-1]} → edge", d, t0, fallbacks)
        finally:
            if not cloud.done():
                cloud.cancel()

    # --- the private loop behind the sync API ---------------------------------------------------

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            with self._lock:
                if self._loop is None:
                    loop = asyncio.new_event_loop()
                    t = threading.Thread(target=loop.run_forever, name="tandem-client-loop", daemon=True)
                    t.start()
                    self._thread = t
                    self._loop = loop
        return self._loop


def _batch(feeds: dict[str, np.ndarray]) -> int:
    shape = next(iter(feeds.values())).shape if feeds else ()
    return shape[0] if shape else 1


async def _stamped(coro: Any) -> tuple[Any, float]:
    """``coro``'s result and when it was ready (to measure the hand-off to the waiting thread)."""
    return await coro, _perf()


def _started_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool whose threads already run: ThreadPoolExecutor starts them lazily inside
    submit(), which waits for the new thread to be scheduled — on a loaded machine that stalled the
    event loop for 100+ ms in the middle of a deadline-bound fallback."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tandem-edge")
    barrier = threading.Barrier(workers)
    for f in [pool.submit(barrier.wait, 10) for _ in range(workers)]:
        f.result()
    return pool
