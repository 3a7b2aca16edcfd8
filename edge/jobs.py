"""Deferrable work from the edge: inference submitted as a cloud job, or left with the device agent
while the cloud is unreachable.

``HybridClient.submit(inputs, defer=True)`` (or :meth:`JobClient.asubmit`) makes a job id (a UUID,
32 hex digits) and submits the request to the cloud's job API (:mod:`tandem.shared.jobs`) with that
id as its ``Idempotency-Key``. When the cloud cannot be reached (no connection, a timeout, 5xx, 429)
and the call allows deferral, the same request goes to the device agent's local API as a ``job``
record of its outbox (``POST /v1/feedback``), stored in SQLite; the agent's uploader submits it with
the same key when the cloud returns. The key makes every submit of one job the same job: the agent's
retry after a crash, and this handle's own look-up.

A :class:`JobHandle` finds its job by the key: while the cloud has not confirmed the job to it, each
``status()``/``result()`` submits the same bytes with the same key (the cloud answers the existing
job, or takes it now if the agent has not yet), so a deferred job is found as soon as the cloud is
reachable, whoever submitted it first. ``status()`` reports ``queued`` while the job waits on the
device (``handle.deferred`` says so). A handle lives in the app's memory: after a restart, submit the
same inputs with the same ``job_id`` to get it back.

Errors: bad inputs are refused before anything is sent; a request the cloud refuses (4xx) raises at
once, deferral or not; a failed job raises its error from ``result()``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from tandem.shared.errors import DeadlineExceeded, InvalidInput, NotFound, TandemError, Unavailable
from tandem.shared.jobs import (
    CALLBACK_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    PREFER_HEADER,
    PREFERENCE_APPLIED_HEADER,
    PRIORITY_HEADER,
    RESPOND_ASYNC,
    JobStatus,
    check_callback_url,
    check_job_id,
    job_path,
    parse_priority,
    result_path,
)
from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, error_from_reply, infer_path

__all__ = ["JobClient", "JobHandle"]

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Statuses after which the cloud counts as unreachable for a submit (the job may be deferred).
_UNREACHABLE = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(slots=True)
class _Job:
    id: str
    model: str
    version: str | None
    priority: int | None
    callback: str | None
    body: bytes
    created: float = field(default_factory=time.time)


class JobClient:
    """Submits jobs for one model to a cloud (``cloud_url``) and defers them to a device agent
    (``agent_url``, its local API). Every method is async; :class:`JobHandle` has sync twins that run
    on ``loop`` (the HybridClient's background loop)."""

    def __init__(
        self,
        model: str,
        *,
        cloud_url: str | None = None,
        api_key: str | None = None,
        agent_url: str | None = None,
        agent_token: str | None = None,
        timeout_s: float = 10.0,
        loop: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        for what, url in (("cloud_url", cloud_url), ("agent_url", agent_url)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise InvalidInput(f"{what} must start with http:// or https://, got {url!r}")
        self.model = model
        self.cloud_url = cloud_url.rstrip("/") if cloud_url else None
        self.agent_url = agent_url.rstrip("/") if agent_url else None
        self._cloud_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._agent_headers = {"Authorization": f"Bearer {agent_token}"} if agent_token else {}
        self.timeout_s = timeout_s
        self._loop = loop

    async def asubmit(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        defer: bool = False,
        version: str | None = None,
        priority: int | None = None,
        callback: str | None = None,
        job_id: str | None = None,
    ) -> JobHandle:
        """Submit one job; see the module docstring. ``feeds`` must already match the model."""
        if defer and self.agent_url is None:
            raise InvalidInput("defer=True needs the device agent that keeps deferred jobs: HybridClient(..., agent_url=...)")
        if self.cloud_url is None and not defer:
            raise InvalidInput("this client has no cloud_url: submit with defer=True to leave the job with the device agent")
        if version is not None and (not isinstance(version, str) or not _PLAIN_NAME.fullmatch(version)):
            # It becomes part of the submit's URL path.
            raise InvalidInput(f"version must be a plain name ([A-Za-z0-9._-]), got {str(version)[:40]!r}")
        if job_id is None:
            job_id = uuid.uuid4().hex
        else:
            try:
                job_id = check_job_id(uuid.UUID(str(job_id)).hex)
            except ValueError:
                raise InvalidInput(f"job_id must be a UUID (32 hex digits), got {str(job_id)[:40]!r}") from None
        if priority is not None:
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise InvalidInput("priority must be an integer")
            parse_priority(str(priority))
        check_callback_url(callback)
        job = _Job(job_id, self.model, version, priority, callback, InferRequest(dict(feeds), id=job_id).to_wire())
        handle = JobHandle(self, job)
        why = "no cloud_url"
        if self.cloud_url is not None:
            try:
                async with self._session() as s:
                    if await handle._submit(s):
                        return handle
                why = "the cloud did not take the job"
            except Unavailable as e:
                why = e.message
            if not defer:
                raise Unavailable(f"{why}; submit with defer=True to leave the job with the device agent")
        await self._defer(job, why)
        handle.deferred = True
        return handle

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def _defer(self, job: _Job, why: str) -> None:
        payload: dict[str, Any] = {"body": base64.b64encode(job.body).decode()}
        if job.priority is not None:
            payload["priority"] = job.priority
        if job.callback is not None:
            payload["callback"] = job.callback
        record: dict[str, Any] = {"id": job.id, "kind": "job", "model": job.model, "payload": payload,
                                  "created_at": job.created}
        if job.version is not None:
            record["version"] = job.version
        try:
            async with self._session() as s:
                async with s.post(f"{self.agent_url}/v1/feedback", json={"records": [record]},
                                  headers=self._agent_headers) as r:
                    raw = await r.read()
                    if r.status != 200:
                        raise _error(r.status, raw)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise Unavailable(f"{why}, and the device agent at {self.agent_url} is unreachable too: "
                              f"{type(e).__name__}: {e}") from None


class JobHandle:
    """One submitted job. ``id`` is the job's id on this device and its Idempotency-Key;
    ``cloud_id`` the cloud's id for it once known; ``deferred`` True while it waits on the device
    as far as this handle knows."""

    def __init__(self, client: JobClient, job: _Job) -> None:
        self._client = client
        self._job = job
        self.id = job.id
        self.model = job.model
        self.version = job.version
        self.cloud_id: str | None = None
        self.deferred = False
        self._last: JobStatus | None = None

    def __repr__(self) -> str:
        where = "deferred on the device" if self.deferred else f"cloud job {self.cloud_id}"
        return f"JobHandle({self.id}, {self.model}, {where})"

    # --- async ------------------------------------------------------------------------------------

    async def astatus(self) -> JobStatus:
        """The job's status document from the cloud; ``queued`` (the device's) while it is deferred
        and the cloud still unreachable."""
        async with self._client._session() as s:
            return await self._status(s)

    async def aresult(self, timeout_s: float | None = None, poll_s: float = 1.0) -> dict[str, np.ndarray]:
        """The job's outputs, waiting for it to finish (polling up to every ``poll_s`` seconds, also
        through an outage). Raises the job's error if it failed, DeadlineExceeded after ``timeout_s``."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.02
        async with self._client._session() as s:
            while True:
                outputs = await self._try_result(s)
                if outputs is not None:
                    return outputs
                if end is not None and time.monotonic() + delay > end:
                    state = "waiting on the device" if self.cloud_id is None else (self._last.status if self._last else "?")
                    raise DeadlineExceeded(f"job {self.id} not finished within {timeout_s:g} s ({state})")
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, poll_s)

    # --- sync (on the client's background loop) ---------------------------------------------------

    def status(self) -> JobStatus:
        return self._sync(self.astatus(), self._client.timeout_s * 3)

    def result(self, timeout_s: float | None = None, poll_s: float = 1.0) -> dict[str, np.ndarray]:
        wait = None if timeout_s is None else timeout_s + self._client.timeout_s * 2
        return self._sync(self.aresult(timeout_s, poll_s), wait)

    def _sync(self, coro: Any, timeout: float | None) -> Any:
        if self._client._loop is None:
            coro.close()
            raise InvalidInput("this handle has no background loop: use its async methods (astatus, aresult)")
        return asyncio.run_coroutine_threadsafe(coro, self._client._loop()).result(timeout)

    # --- internals --------------------------------------------------------------------------------

    async def _submit(self, s: aiohttp.ClientSession) -> bool:
        """Submit (or find) the job in the cloud: True once the cloud has it; False if the cloud
        answered without taking it as a job; Unavailable while unreachable; the cloud's error on 4xx."""
        c, job = self._client, self._job
        headers = {**c._cloud_headers, "Content-Type": CONTENT_TYPE, PREFER_HEADER: RESPOND_ASYNC,
                   IDEMPOTENCY_KEY_HEADER: job.id}
        if job.priority is not None:
            headers[PRIORITY_HEADER] = str(job.priority)
        if job.callback is not None:
            headers[CALLBACK_HEADER] = job.callback
        status, rh, raw = await self._request(s, "POST", infer_path(job.model, job.version), job.body, headers)
        if status in (200, 202) and RESPOND_ASYNC in rh.get(PREFERENCE_APPLIED_HEADER, ""):
            self._last = _status_doc(raw)
            self.cloud_id = self._last.id
            self.deferred = False
            return True
        if status in (200, 202):
            return False  # answered synchronously: this cloud has no job API
        raise _error(status, raw)

    async def _request(self, s: aiohttp.ClientSession, method: str, path: str, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None, plain: bool = False) -> tuple[int, Mapping[str, str], bytes]:
        """One request to the cloud; Unavailable when it cannot be reached or (unless ``plain``)
        answers a status that says it is down or overloaded."""
        c = self._client
        if c.cloud_url is None:
            raise Unavailable("no cloud_url")
        try:
            async with s.request(method, c.cloud_url + path, data=body, headers=headers or c._cloud_headers) as r:
                raw = await r.read()
                status, rh = r.status, r.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise Unavailable(f"cloud unreachable: {type(e).__name__}: {e}") from None
        if status in _UNREACHABLE and not plain:
            raise Unavailable(f"cloud answered HTTP {status}: {_error(status, raw).message}")
        return status, rh, raw

    async def _known(self, s: aiohttp.ClientSession) -> bool:
        """Whether the cloud's id is known (looking it up by the key if need be); False while unreachable."""
        if self.cloud_id is not None:
            return True
        try:
            return await self._submit(s)
        except Unavailable:
            return False

    async def _status(self, s: aiohttp.ClientSession) -> JobStatus:
        if not await self._known(s):
            job = self._job
            return JobStatus(id=job.id, model=job.model, version=job.version, status="queued",
                             priority=job.priority or 0, created=job.created)
        assert self.cloud_id is not None
        try:
            status, _, raw = await self._request(s, "GET", job_path(self.cloud_id))
        except Unavailable:
            if self._last is not None:
                return self._last
            raise
        if status != 200:
            raise _error(status, raw, f"job {self.id}")
        self._last = _status_doc(raw)
        return self._last

    async def _try_result(self, s: aiohttp.ClientSession) -> dict[str, np.ndarray] | None:
        if not await self._known(s):
            return None
        assert self.cloud_id is not None
        try:
            # plain: a failed job answers its own error status, 5xx included.
            status, _, raw = await self._request(s, "GET", result_path(self.cloud_id), plain=True)
            if status in _UNREACHABLE and (await self._status(s)).status != "failed":
                return None  # the cloud is down or overloaded, the job not failed: keep waiting
        except Unavailable:
            return None  # the cloud went away again: keep waiting
        if status == 202:
            self._last = _status_doc(raw)
            return None
        if status == 200:
            try:
                return InferResponse.from_wire(raw).outputs
            except TandemError as e:
                raise Unavailable(f"job {self.id}: the cloud sent an unreadable result: {e.message}") from None
        raise _error(status, raw, f"job {self.id}")


def _status_doc(raw: bytes) -> JobStatus:
    try:
        return JobStatus.from_dict(json.loads(raw))
    except ValueError:
        raise Unavailable("the cloud answered a job request without a JSON status document") from None


def _error(status: int, raw: bytes, where: str | None = None) -> TandemError:
    err = error_from_reply(status, raw)
    if status == 404 and where and not isinstance(err, NotFound):
        err = NotFound(err.message)
    if where:
        err.message = f"{where}: {err.message}"
        err.args = (err.message,)
    return err
