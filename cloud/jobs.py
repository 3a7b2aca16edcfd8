"""Asynchronous jobs: submit, look up, cancel, and run them through the model's batcher.

:class:`JobService` is what the routes (:mod:`.job_routes`) call: it validates a submit exactly as
the synchronous call would (model, decoding, input names/types/shapes, requested outputs, rows),
stores the job in its :class:`~.job_queue.JobQueue` and answers from it. With the embedded queue
it also runs the jobs (:meth:`JobService.start` starts its dispatcher); with Redis, ``tandem
worker`` processes do (:mod:`.worker`), and ``tandem serve`` only submits and answers.

:class:`JobRunner` runs claimed jobs, in both places: it decodes each job's request with its
protocol's decoder, coalesces the jobs of one model whose inputs share a shape into batches of up
to the model's request limit (``max_request_rows``, by default its max batch size), submits each
batch to the model's batcher at the lowest priority level, and encodes each job's slice of the
outputs exactly as the synchronous call would have answered (or its error, as that call's status
and body). So that jobs run below online traffic whatever the priority levels, a job batch is
submitted only while the model's queue is empty: online requests wait behind at most one job batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from tandem.shared import protocol as p
from tandem.shared.errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    TandemError,
    Unavailable,
)
from tandem.shared.jobs import (
    CALLBACK_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    PRIORITY_HEADER,
    check_callback_url,
    check_idempotency_key,
    check_job_id,
    new_job_id,
    parse_priority,
)
from tandem.shared.tensors import packb

from . import native, v2
from .config import JobsConfig, ServerConfig
from .inference import Inference, Outcome
from .job_queue import Completion, JobQueue, JobRecord, SqliteJobQueue, consume, request_hash
from .repository import ServedModel

__all__ = ["Callbacks", "JobRunner", "JobService", "open_queue"]

_log = logging.getLogger("tandem.cloud.jobs")

#: Jobs the embedded dispatcher claims at once, and how many claimed groups may run together.
_CLAIM_JOBS = 64
_RUNS_IN_FLIGHT = 2
#: Seconds between looks at a busy model queue before a job batch is submitted.
_IDLE_POLL_S = 0.001
#: Longest a job batch waits after the model's queue refused it (Overloaded) before retrying.
_MAX_BACKOFF_S = 1.0


def open_queue(config: ServerConfig) -> JobQueue:
    """The queue engine ``config.jobs.queue`` names: the embedded SQLite store, or Redis."""
    if config.jobs.queue == "embedded":
        return SqliteJobQueue(config.jobs_path())
    from .redis_queue import RedisJobQueue

    return RedisJobQueue(config.jobs.queue, prefix=config.jobs.redis_prefix, claim_timeout_s=config.jobs.claim_timeout_s)


# --- answers as the synchronous call gives them ---------------------------------------------------


def error_answer(protocol: str, error: TandemError, served: ServedModel | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) the synchronous call answers for ``error``: msgpack ``{"error",
    "code"}`` on the native protocol, JSON on v2 (as the server's middleware encodes them)."""
    headers: dict[str, str] = {}
    if served is not None:
        headers[p.HEADER_MODEL_VERSION] = served.version
    if isinstance(error, Overloaded) or error.status in (429, 503):
        headers[p.HEADER_RETRY_AFTER] = str(max(1, int(getattr(error, "retry_after", 1.0) or 1)))
    doc = error.to_dict()
    if protocol == "v1":
        headers["Content-Type"] = p.CONTENT_TYPE
        try:
            body = packb(doc)
        except (TypeError, ValueError, OverflowError):
            body = packb({"error": error.message, "code": error.code})
    else:
        headers["Content-Type"] = "application/json"
        try:
            body = json.dumps(doc).encode()
        except (TypeError, ValueError, RecursionError):
            body = json.dumps({"error": error.message, "code": error.code}).encode()
    return error.status, headers, body


def _failure(job: JobRecord, error: TandemError, served: ServedModel | None, started: float | None) -> Completion:
    status, headers, body = error_answer(job.protocol, error, served)
    return Completion(
        job.id, "failed", status, headers, body, {"error": error.message, "code": error.code, "status": status},
        served.version if served is not None else None, started, job.receipt,
    )


class _Decoded:
    """One job ready to run: its model, decoded request, inputs and rows."""

    __slots__ = ("inputs", "job", "outputs", "request", "rows", "served")

    def __init__(self, job: JobRecord, served: ServedModel, request: Any, inputs: Mapping[str, np.ndarray], outputs: list[str] | None, rows: int) -> None:
        self.job, self.served, self.request, self.inputs, self.outputs, self.rows = job, served, request, inputs, outputs, rows


def decode_request(inference: Inference, protocol: str, served: ServedModel, body: bytes, header_length: str | None) -> tuple[Any, Mapping[str, np.ndarray], list[str] | None, int]:
    """Decode and check one request as the synchronous call would: (request, inputs, outputs, rows).
    Raises the TandemError that call would answer."""
    req: Any
    if protocol == "v1":
        req = inference.decoder.decode(body)
        outputs = list(req.outputs) if req.outputs is not None else None
    else:
        req = inference.v2_decoder.decode(body, header_length)
        outputs = [o.name for o in req.outputs] if req.outputs is not None else None
    rows = served.engine.check_inputs(req.inputs)
    if outputs is not None:
        unknown = [o for o in outputs if o not in served.engine.output_names]
        if unknown:
            raise InvalidInput(
                f"unknown output(s) {', '.join(map(repr, unknown))}; the model has {', '.join(served.engine.output_names)}"
            )
    limit = served.batcher.config.request_rows
    if rows > limit:
        raise InvalidInput(
            f"model {served.name}: a request may carry at most {limit} rows (max_request_rows), "
            f"this one has {rows}: send it as requests of at most {limit} rows"
        )
    return req, req.inputs, outputs, rows


class JobRunner:
    """Runs claimed jobs through the models' batchers (see the module docstring)."""

    def __init__(self, inference: Inference, *, below_online: bool = True) -> None:
        self.inference = inference
        #: Submit a job batch only while the model's queue is empty (a server with online
        #: traffic). A worker has none: it submits a claimed group's batches at once, and the
        #: batcher runs them back to back.
        self.below_online = below_online

    async def run(self, jobs: list[JobRecord]) -> tuple[list[Completion], list[JobRecord]]:
        """(completions, jobs to give back unrun because a model's queue refused them for now)."""
        done: list[Completion] = []
        groups: dict[tuple[int, tuple[Any, ...]], list[_Decoded]] = defaultdict(list)
        started = time.time()
        for job in jobs:
            served = None
            try:
                served = self.inference.resolve(job.model, job.version)
                req, inputs, outputs, rows = decode_request(self.inference, job.protocol, served, job.body, job.header_length)
            except TandemError as e:
                if served is not None:
                    served.metrics.failure(e.code)
                done.append(_failure(job, e, served, started))
                continue
            except Exception as e:  # noqa: BLE001 - a decoder bug must fail one job, not the worker
                _log.exception("job %s could not be decoded", job.id)
                done.append(_failure(job, InvalidInput(f"malformed request: {type(e).__name__}: {e}"), served, started))
                continue
            sig = tuple((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())
            groups[(id(served), sig)].append(_Decoded(job, served, req, inputs, outputs, rows))
        back: list[JobRecord] = []
        if len(groups) == 1:  # the usual claim: one model, one input layout (no task to gather)
            results = [await self._run_group(next(iter(groups.values())), started)]
        else:
            results = await asyncio.gather(*(self._run_group(items, started) for items in groups.values()))
        for completions, refused in results:
            done.extend(completions)
            back.extend(refused)
        return done, back

    async def _run_group(self, items: list[_Decoded], started: float) -> tuple[list[Completion], list[JobRecord]]:
        served = items[0].served
        limit = served.batcher.config.request_rows if served.engine.batchable else 1
        chunks: list[list[_Decoded]] = []
        rows = 0
        for item in items:
            if not chunks or rows + item.rows > limit or not served.engine.batchable:
                chunks.append([])
                rows = 0
            chunks[-1].append(item)
            rows += item.rows
        done: list[Completion] = []
        if not self.below_online:
            outcomes: list[Any]
            if len(chunks) == 1:
                try:
                    outcomes = [await self._run_chunk(chunks[0], started)]
                except (Overloaded, Unavailable) as e:
                    outcomes = [e]
            else:
                outcomes = await asyncio.gather(*(self._run_chunk(c, started) for c in chunks), return_exceptions=True)
            back: list[JobRecord] = []
            for chunk, outcome in zip(chunks, outcomes):
                if isinstance(outcome, (Overloaded, Unavailable)):
                    back.extend(d.job for d in chunk)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    done.extend(outcome)
            return done, back
        for i, chunk in enumerate(chunks):
            try:
                done.extend(await self._run_chunk(chunk, started))
            except (Overloaded, Unavailable) as e:
                # The model's queue is full or the model is going away: these jobs wait for later.
                _log.info("job batch of %s deferred: %s", served.name, e.message)
                return done, [d.job for c in chunks[i:] for d in c]
        return done, []

    async def _run_chunk(self, chunk: list[_Decoded], started: float) -> list[Completion]:
        served = chunk[0].served
        batcher = served.batcher
        # Below online traffic: submit only while nothing waits in the model's queue.
        while self.below_online and batcher.depth:
            await asyncio.sleep(_IDLE_POLL_S)
        if len(chunk) == 1:
            inputs = chunk[0].inputs
        else:
            inputs = {name: np.concatenate([d.inputs[name] for d in chunk]) for name in chunk[0].inputs}
        total = sum(d.rows for d in chunk)
        try:
            future = batcher.submit(inputs, total, priority=batcher.config.priority_levels)
            result = await future
        except (Overloaded, Unavailable):
            raise
        except TandemError as e:
            if len(chunk) > 1:
                # Which job broke the batch? Each runs alone, so each gets its own answer.
                out: list[Completion] = []
                for d in chunk:
                    out.extend(await self._run_chunk([d], started))
                return out
            served.metrics.failure(e.code)
            return [_failure(chunk[0].job, e, served, started)]
        completions = []
        at = 0
        # Every native answer of one batch carries the same headers: built once, shared.
        native_headers: dict[str, str] | None = None
        for d in chunk:
            outputs = result.outputs
            if len(chunk) > 1:
                outputs = {k: v[at:at + d.rows] for k, v in outputs.items()}
            at += d.rows
            if d.outputs is not None:
                outputs = {k: outputs[k] for k in d.outputs}
            outcome = Outcome(served, outputs, result.queue_us, result.compute_us, result.batch_size)
            if native_headers is not None and d.job.protocol == "v1":
                completions.append(self._native_success(d, outcome, native_headers, started))
                continue
            done = self._success(d, outcome, started)
            if d.job.protocol == "v1" and done.status == "succeeded":
                native_headers = done.result_headers
            completions.append(done)
        return completions

    def _native_success(self, d: _Decoded, outcome: Outcome, headers: dict[str, str], started: float) -> Completion:
        """A native answer after the batch's first: the same headers (timing, batch, version: the
        batch's), the body as :func:`.native.reply` encodes it."""
        job, served = d.job, d.served
        try:
            body = p.InferResponse(outcome.outputs, served.name, served.version, d.request.id or job.id).to_wire()
        except TandemError as e:
            return _failure(job, e, served, started)
        return Completion(job.id, "succeeded", 200, headers, bytes(body), None, served.version, started, job.receipt)

    def _success(self, d: _Decoded, outcome: Outcome, started: float) -> Completion:
        job = d.job
        try:
            if job.protocol == "v1":
                headers, body = native.reply(self.inference, outcome, d.request, job.id)
            else:
                body, headers = v2.reply(self.inference, outcome, d.request)
        except TandemError as e:
            return _failure(job, e, d.served, started)
        return Completion(job.id, "succeeded", 200, dict(headers), bytes(body), None, d.served.version, started, job.receipt)


# --- callbacks ------------------------------------------------------------------------------------


class Callbacks:
    """POSTs a finished job's status document to its callback URL, with bounded retries."""

    def __init__(self, attempts: int, timeout_s: float) -> None:
        self.attempts = attempts
        self.timeout_s = timeout_s
        self._session: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0

    def notify(self, jobs: list[JobRecord]) -> None:
        for job in jobs:
            if job.callback:
                task = asyncio.create_task(self._send(job.callback, job.status_document().to_dict(), job.id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, url: str, doc: dict[str, Any], job_id: str) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        delay = 0.5
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._session.post(url, json=doc, allow_redirects=False) as resp:
                    await resp.read()
                    if resp.status < 500 and resp.status != 429:
                        self.sent += 1
                        if resp.status >= 400:
                            _log.warning("callback of job %s to %s answered %d", job_id, url, resp.status)
                        return
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                _log.info("callback of job %s to %s failed (attempt %d): %s", job_id, url, attempt, e)
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        self.failed += 1
        _log.warning("callback of job %s to %s gave up after %d attempts", job_id, url, self.attempts)

    async def close(self, timeout_s: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- the service ----------------------------------------------------------------------------------


class JobService:
    """The job API over one queue engine; runs the jobs itself when ``run_jobs`` (embedded queue)."""

    def __init__(
        self, config: JobsConfig, queue: JobQueue, inference: Inference, *, run_jobs: bool, ready: Any = None
    ) -> None:
        self.config = config
        self.queue = queue
        self.inference = inference
        self.runner = JobRunner(inference)
        self.callbacks = Callbacks(config.callback_attempts, config.callback_timeout_s)
        self._run_jobs = run_jobs
        self._ready = ready or (lambda: True)
        self._dispatcher: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[None]] = set()
        self._stopping = False

    # --- submit / get / delete --------------------------------------------------------------------

    async def submit(
        self, protocol: str, model: str, version: str | None, body: bytes, headers: Mapping[str, str]
    ) -> tuple[JobRecord, bool]:
        """Validate a submit as the synchronous call would, then store the job: (job, created)."""
        key = check_idempotency_key(headers.get(IDEMPOTENCY_KEY_HEADER))
        priority = parse_priority(headers.get(PRIORITY_HEADER))
        callback = check_callback_url(headers.get(CALLBACK_HEADER))
        header_length = headers.get("Inference-Header-Content-Length") if protocol == "v2" else None
        served = self.inference.resolve(model, version)
        try:
            _, _, _, rows = decode_request(self.inference, protocol, served, body, header_length)
        except TandemError as e:
            served.metrics.failure(e.code)
            raise
        job = JobRecord(
            id=new_job_id(), model=model, version=version, protocol=protocol, body=bytes(body),
            header_length=header_length, rows=rows, priority=priority, created=time.time(),
            body_hash=request_hash(protocol, model, version, header_length, bytes(body)),
            idempotency_key=key, callback=callback, served_version=served.version,
        )
        return await self.queue.put(job, self.config.max_queued)

    async def get(self, job_id: str) -> JobRecord:
        check_job_id(job_id)
        job = await self.queue.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id} (unknown, deleted or expired)")
        return job

    async def delete(self, job_id: str) -> None:
        check_job_id(job_id)
        if not await self.queue.delete(job_id):
            raise NotFound(f"no job {job_id} (unknown, deleted or expired)")

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._run_jobs:
            again = await self.queue.recover()
            if again:
                _log.info("%d job(s) left running by the previous run are queued again", again)
            self._dispatcher = asyncio.create_task(self._dispatch())

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop claiming, let claimed batches finish (their results are stored) within
        ``timeout_s``, then close the queue. What is cut short stays queued/running in the store
        and runs again at the next start."""
        self._stopping = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        if self._runs:
            await asyncio.wait(list(self._runs), timeout=timeout_s)
            for task in list(self._runs):
                task.cancel()
        await self.callbacks.close()
        await self.queue.close()

    async def _dispatch(self) -> None:
        while not self._ready():  # models load (and warm up) first: jobs must not fail for that
            await asyncio.sleep(0.05)
        await consume(self.queue, _CLAIM_JOBS, self._run_claimed, self._runs, in_flight=_RUNS_IN_FLIGHT,
                      stopped=lambda: self._stopping, pause=asyncio.sleep)

    async def _run_claimed(self, jobs: list[JobRecord]) -> None:
        try:
            done, back = await self.runner.run(jobs)
            if done:
                finished = await self.queue.complete(done, self.config.result_ttl_s)
                self.callbacks.notify(finished)
            if back:
                await asyncio.sleep(min(_MAX_BACKOFF_S, 0.05 * len(back)))
                await self.queue.release(back)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - left running in the store: the next start runs them again
            _log.exception("a batch of %d job(s) failed to run; they stay in the store", len(jobs))
