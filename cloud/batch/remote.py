"""Rows as jobs on a ``tandem serve``'s job API (``tandem batch --queue URL``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from tandem.shared.bundle import version_key
from tandem.shared.errors import InvalidInput, TandemError, TensorCodecError
from tandem.shared.tensors import datatype_of, dtype_of

from .compute import scatter, to_batches
from .formats import Rows, check_names

__all__ = ["QueueCompute"]

_log = logging.getLogger(__name__)


# --- rows as jobs on a server ------------------------------------------------------------------

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class QueueCompute:
    """Rows as jobs on a ``tandem serve``'s job API (:mod:`tandem.shared.jobs`): one job per batch,
    submitted with ``Prefer: respond-async`` and an ``Idempotency-Key`` made of the run's id, the
    chunk and the batch, so a resumed run (or a retried submit) finds the same jobs instead of making
    new ones. The model's signature comes from the server's v2 metadata; rows are checked against it
    before anything is sent. A run without a version is pinned to the latest version served when it
    starts, so every chunk of it is computed by the same one."""

    def __init__(self, url: str, model: str, *, batch_size: int = 64, api_key: str | None = None,
                 priority: int | None = None, concurrency: int = 8, request_timeout_s: float = 60.0,
                 give_up_s: float = 600.0) -> None:
        from tandem.shared.jobs import MAX_PRIORITY, MIN_PRIORITY

        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--queue must be the http(s) URL of a tandem serve, got {url!r}")
        name, _, version = model.partition(":")
        for part in (name, version):
            if part and (set(part) - _NAME_OK or part in (".", "..")):
                raise InvalidInput(f"MODEL {model!r}: with --queue, MODEL is the served model's name or name:version")
        if not name:
            raise InvalidInput("MODEL: give the served model's name or name:version")
        if priority is not None and not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidInput(f"--priority must be within {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
        self.url, self.name, self.batch_size = url.rstrip("/"), name, batch_size
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._priority, self._concurrency = priority, concurrency
        self._timeout_s, self._give_up_s = request_timeout_s, give_up_s
        self._run_id = "run"
        self._loop = asyncio.new_event_loop()
        self._session: Any = None
        try:
            meta = self._loop.run_until_complete(self._metadata(version or None))
        except BaseException:
            self.close()
            raise
        versions = [str(v) for v in meta.get("versions") or []]
        self.version = version or (max(versions, key=version_key) if versions else None)
        try:
            self.inputs = [(t["name"], dtype_of(t["datatype"]), len(t["shape"])) for t in meta["inputs"]]
            self._shapes = {t["name"]: [None if d < 0 else d for d in t["shape"]] for t in meta["inputs"]}
            self.output_names = [t["name"] for t in meta["outputs"]]
        except (KeyError, TypeError) as e:
            self.close()
            raise TandemError(f"{self.url} answered the metadata of {name} without {e}") from None
        # A job carries one request: no more rows than the server takes in one.
        try:
            config = self._loop.run_until_complete(self._metadata(self.version, "/config"))
            most = int((config.get("parameters") or {}).get("max_request_rows") or 0)
        except (TandemError, TypeError, ValueError):
            most = 0
        if 0 < most < batch_size:
            _log.info("%s takes at most %d rows per request: jobs of %d rows", self.url, most, most)
            self.batch_size = most
        # The batch size is part of the identity: the jobs' keys name batches by their index.
        self.identity = {"model": name, "version": self.version, "queue": self.url, "job_rows": self.batch_size}

    def begin(self, run_id: str) -> None:
        self._run_id = run_id

    def check(self, rows: dict[str, np.ndarray], where: str) -> None:
        check_names(list(rows), [n for n, _, _ in self.inputs], where, "rows")
        for name, dtype, rank in self.inputs:
            arr, want = rows[name], self._shapes[name]
            if arr.dtype != dtype:
                raise TensorCodecError(f"{where}: input {name!r} must be {datatype_of(dtype)}, got {datatype_of(arr.dtype)}")
            if arr.ndim != rank or any(w is not None and w != g for w, g in zip(want, arr.shape)):
                raise InvalidInput(f"{where}: input {name!r} must have shape {[-1 if d is None else d for d in want]}, got {list(arr.shape)}")

    def run(self, chunk: int, rows: Rows, where: str) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
        batches, idx = to_batches(rows, self.batch_size)
        for feeds in batches:
            self.check(feeds, where)
        results = self._loop.run_until_complete(self._run_jobs(chunk, batches, where))
        return scatter(results, idx, len(rows), self.output_names)

    def close(self) -> None:
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()

    # --- HTTP ---------------------------------------------------------------------------------

    def _http(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self._session

    async def _request(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                       retry: tuple[int, ...] = (429, 503), give_up_s: float | None = None) -> tuple[int, Mapping[str, str], bytes]:
        """One request, retried while the server is unreachable or answers a ``retry`` status (overloaded),
        for up to ``give_up_s`` (default: the client's)."""
        import aiohttp

        from tandem.shared.errors import Unavailable

        end = time.monotonic() + (self._give_up_s if give_up_s is None else give_up_s)
        delay = 0.2
        while True:
            try:
                async with self._http().request(method, self.url + path, data=body,
                                                 headers={**self._headers, **(headers or {})}) as r:
                    raw = await r.read()
                    status, rh = r.status, r.headers
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                if time.monotonic() > end:
                    raise Unavailable(f"the queue at {self.url} is unreachable: {type(e).__name__}: {e}") from None
                status, rh, raw = 0, {}, b""
            if status != 0 and status not in retry:
                return status, rh, raw
            if time.monotonic() > end:
                raise server_error(status, raw, f"the queue at {self.url}")
            try:
                wait = float(rh.get("Retry-After", delay))
            except ValueError:
                wait = delay
            await asyncio.sleep(min(max(wait, 0.05), 5.0))
            delay = min(delay * 2, 5.0)

    async def _metadata(self, version: str | None, what: str = "") -> dict[str, Any]:
        path = f"/v2/models/{self.name}" + (f"/versions/{version}" if version else "") + what
        # Asked before any work: a server that is not there is reported within seconds, not minutes.
        status, _, raw = await self._request("GET", path, give_up_s=min(self._give_up_s, 10.0))
        if status != 200:
            raise server_error(status, raw, f"model {self.name} at {self.url}")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise TandemError(f"{self.url}{path} did not answer JSON model metadata") from None
        if not isinstance(doc, dict):
            raise TandemError(f"{self.url}{path} did not answer a JSON object")
        return doc

    async def _run_jobs(self, chunk: int, batches: list[dict[str, np.ndarray]], where: str) -> list[dict[str, np.ndarray]]:
        sem = asyncio.Semaphore(self._concurrency)

        async def one(j: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            key = f"tandem-batch:{self._run_id}:{chunk}:{j}"
            async with sem:
                return await self._job(key, feeds, where)

        try:
            async with asyncio.TaskGroup() as tg:  # the first failure cancels the rest
                tasks = [tg.create_task(one(j, f)) for j, f in enumerate(batches)]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _job(self, key: str, feeds: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        from tandem.shared.jobs import IDEMPOTENCY_KEY_HEADER, PREFER_HEADER, PRIORITY_HEADER, RESPOND_ASYNC, result_path
        from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, infer_path

        body = InferRequest(feeds).to_wire()
        headers = {"Content-Type": CONTENT_TYPE, PREFER_HEADER: RESPOND_ASYNC, IDEMPOTENCY_KEY_HEADER: key}
        if self._priority is not None:
            headers[PRIORITY_HEADER] = str(self._priority)
        for _ in range(3):  # a job forgotten (expired) between submit and result is submitted again
            status, _, raw = await self._request("POST", infer_path(self.name, self.version), body, headers)
            if status not in (200, 202):
                raise server_error(status, raw, where)
            try:
                job_id = str(json.loads(raw)["id"])
            except (ValueError, KeyError, TypeError):
                raise TandemError(f"{self.url} answered a job submit without a job id") from None
            delay = 0.02
            while True:
                # A failed job answers its own error status (503 too): only an unreachable server is retried.
                status, _, raw = await self._request("GET", result_path(job_id), retry=())
                if status == 200:
                    return InferResponse.from_wire(raw).outputs
                if status == 404:
                    break
                if status != 202:
                    raise server_error(status, raw, where)
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 1.0)
        raise TandemError(f"{where}: the queue at {self.url} kept forgetting the job {key}")


def server_error(status: int, raw: bytes, where: str) -> TandemError:
    from tandem.shared.protocol import error_from_reply

    err = error_from_reply(status or 503, raw)
    err.message = f"{where}: {err.message}"
    err.args = (err.message,)
    return err
