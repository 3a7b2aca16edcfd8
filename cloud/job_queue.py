"""The job queue behind the asynchronous job API: one small interface, two engines.

:class:`JobQueue` is what the job service and ``tandem worker`` need from a queue engine: ``put``
(with the idempotency key and the queue bound), ``claim`` (jobs to run, best priority first, marked
running), ``complete`` (store results, once per job id), ``release`` (give a claimed job back),
``get``, ``delete``, ``recover`` and ``close``. :class:`SqliteJobQueue` here is the embedded engine
(``tandem serve`` alone); :mod:`.redis_queue` is the scale-out engine (Redis Streams).

The embedded engine keeps every job in one SQLite file in WAL mode with ``synchronous=FULL``: a
submit is answered 202 only once its row is on disk, so a restart loses no accepted job (jobs found
``running`` at start were cut short and are queued again by :meth:`SqliteJobQueue.recover`). A
result is written only while its job is unfinished (``UPDATE ... WHERE status IN ('queued',
'running')``), so a job that runs twice still has exactly one result. Every database call runs on
one dedicated thread: SQLite wants a single writer, and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tandem.shared.errors import InvalidInput, Overloaded, Unavailable
from tandem.shared.jobs import TERMINAL_STATUSES, JobConflict, JobStatus, result_path

from .sqlite_wal import open_wal

_log = logging.getLogger("tandem.cloud.jobs")

__all__ = ["Completion", "JobQueue", "JobRecord", "SqliteJobQueue", "consume", "request_hash"]

T = TypeVar("T")


def request_hash(protocol: str, model: str, version: str | None, header_length: str | None, body: bytes) -> str:
    """What makes two submits the same request (for the idempotency key)."""
    h = hashlib.sha256()
    for part in (protocol, model, version or "", header_length or ""):
        h.update(part.encode())
        h.update(b"\0")
    h.update(body)
    return h.hexdigest()


@dataclass(slots=True)
class JobRecord:
    """One job as a queue engine stores it: the request as received, its state and its result."""

    id: str
    model: str
    #: The version the submit named (None: whichever serves the model when the job runs).
    version: str | None
    #: "v1" (native msgpack) or "v2" (Open Inference Protocol v2): how to decode and answer.
    protocol: str
    body: bytes
    #: v2's Inference-Header-Content-Length (binary tensor extension), as sent.
    header_length: str | None
    rows: int
    priority: int
    created: float
    body_hash: str
    idempotency_key: str | None = None
    callback: str | None = None
    status: str = "queued"
    started: float | None = None
    finished: float | None = None
    expires: float | None = None
    #: The version that ran the job (or, before it ran, the one the submit resolved to).
    served_version: str | None = None
    error: dict[str, Any] | None = None
    #: The synchronous call's answer: HTTP status, headers (Content-Type, X-Tandem-*), body.
    result_status: int | None = None
    result_headers: dict[str, str] = field(default_factory=dict)
    result_body: bytes | None = None
    #: Engine-specific handle of a claimed job (the Redis stream entry), for complete/release.
    receipt: Any = None

    def status_document(self) -> JobStatus:
        done = self.status in TERMINAL_STATUSES
        return JobStatus(
            id=self.id,
            model=self.model,
            version=self.version or self.served_version,
            status=self.status,  # type: ignore[arg-type]
            priority=self.priority,
            created=self.created,
            started=self.started,
            finished=self.finished,
            error=self.error,
            result=result_path(self.id) if done else None,
            expires=self.expires,
        )


@dataclass(slots=True)
class Completion:
    """The end of one job: succeeded (2xx) or failed, with the answer the synchronous call gives."""

    job_id: str
    status: str  # "succeeded" | "failed"
    result_status: int
    result_headers: dict[str, str]
    result_body: bytes
    error: dict[str, Any] | None
    served_version: str | None
    started: float | None = None
    receipt: Any = None


class JobQueue(Protocol):
    """What the job service and the workers need from a queue engine."""

    async def put(self, job: JobRecord, max_queued: int) -> tuple[JobRecord, bool]:
        """Store a new job, or answer the job an idempotency key already names: (job, created).
        Raises JobConflict (same key and model, another request), Overloaded (``max_queued`` jobs
        unfinished) or Unavailable (the engine cannot be reached)."""
        ...

    async def claim(self, limit: int, wait_s: float) -> list[JobRecord]:
        """Up to ``limit`` queued jobs, best priority first then oldest, now marked running;
        waits up to ``wait_s`` for one when none is queued."""
        ...

    async def complete(self, completions: list[Completion], ttl_s: float) -> list[JobRecord]:
        """Store results; a job already finished or forgotten keeps what it has. Returns the jobs
        this call finished that have a callback URL (to notify)."""
        ...

    async def release(self, jobs: list[JobRecord]) -> None:
        """Give claimed jobs back to the queue unrun (e.g. the model's queue was full)."""
        ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or expired."""
        ...

    async def delete(self, job_id: str) -> bool:
        """Cancel a queued job or forget any other; False when unknown."""
        ...

    async def recover(self) -> int:
        """At start: jobs a previous run left running are queued again; returns how many."""
        ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    model          TEXT NOT NULL,
    version        TEXT,
    protocol       TEXT NOT NULL,
    body           BLOB NOT NULL,
    header_length  TEXT,
    rows           INTEGER NOT NULL,
    priority       INTEGER NOT NULL,
    created        REAL NOT NULL,
    body_hash      TEXT NOT NULL,
    idem_key       TEXT,
    callback       TEXT,
    status         TEXT NOT NULL,
    started        REAL,
    finished       REAL,
    expires        REAL,
    served_version TEXT,
    error          TEXT,
    result_status  INTEGER,
    result_headers TEXT,
    result_body    BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (model, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires) WHERE expires IS NOT NULL;
"""
_COLUMNS = (
    "id", "model", "version", "protocol", "body", "header_length", "rows", "priority", "created", "body_hash",
    "idem_key", "callback", "status", "started", "finished", "expires", "served_version", "error",
    "result_status", "result_headers", "result_body",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
#: Seconds between purges of expired jobs (a purge also runs when the queue opens).
_PURGE_EVERY_S = 60.0


async def consume(
    queue: JobQueue, size: int, handle: Callable[[list[JobRecord]], Coroutine[Any, Any, None]],
    running: set[asyncio.Task[None]], *, in_flight: int, stopped: Callable[[], bool],
    pause: Callable[[float], Awaitable[Any]],
) -> None:
    """Claim up to ``size`` jobs at a time and run ``handle`` on each claim as a task (kept in
    ``running`` until it ends), at most ``in_flight`` at once, until ``stopped()``. A queue that
    is unavailable is retried after ``pause(1.0)``, logged once per outage."""
    slots = asyncio.Semaphore(in_flight)
    down = False
    while not stopped():
        await slots.acquire()
        try:
            jobs = await queue.claim(size, 1.0)
            down = False
        except Unavailable as e:
            slots.release()
            if not down:
                _log.warning("job queue unavailable: %s; retrying", e.message)
                down = True
            await pause(1.0)
            continue
        except BaseException:
            slots.release()
            raise
        if not jobs:
            slots.release()
            continue
        task = asyncio.create_task(handle(jobs))
        running.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            running.discard(t)
            slots.release()

        task.add_done_callback(finished)


def _row_to_job(row: tuple[Any, ...]) -> JobRecord:
    d = dict(zip(_COLUMNS, row))
    return JobRecord(
        id=d["id"], model=d["model"], version=d["version"], protocol=d["protocol"], body=bytes(d["body"]),
        header_length=d["header_length"], rows=d["rows"], priority=d["priority"], created=d["created"],
        body_hash=d["body_hash"], idempotency_key=d["idem_key"], callback=d["callback"], status=d["status"],
        started=d["started"], finished=d["finished"], expires=d["expires"], served_version=d["served_version"],
        error=json.loads(d["error"]) if d["error"] else None, result_status=d["result_status"],
        result_headers=json.loads(d["result_headers"]) if d["result_headers"] else {},
        result_body=bytes(d["result_body"]) if d["result_body"] is not None else None,
    )


class SqliteJobQueue:
    """The embedded engine: one SQLite file (WAL, synchronous=FULL), one database thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            # Never create it: a missing directory is a typo in the configuration, not a request.
            raise InvalidInput(f"the job store's directory {self.path.parent} does not exist")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-jobs")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._wake: asyncio.Event | None = None
        self._purged = 0.0
        try:
            self._pool.submit(self._open).result()
        except BaseException as e:
            self._pool.shutdown(wait=True)
            if isinstance(e, sqlite3.Error):
                raise InvalidInput(f"cannot open the job store {self.path}: {e}") from None
            raise

    # --- JobQueue -------------------------------------------------------------------------------

    async def put(self, job: JobRecord, max_queued: int) -> tuple[JobRecord, bool]:
        found, created = await self._run(self._put, job, max_queued, time.time())
        if created:
            self._event().set()
        return found, created

    async def claim(self, limit: int, wait_s: float) -> list[JobRecord]:
        wake = self._event()
        wake.clear()
        jobs = await self._run(self._claim, limit, time.time())
        if jobs or wait_s <= 0:
            return jobs
        try:
            await asyncio.wait_for(wake.wait(), wait_s)
        except TimeoutError:
            pass
        return await self._run(self._claim, limit, time.time())

    async def complete(self, completions: list[Completion], ttl_s: float) -> list[JobRecord]:
        return await self._run(self._complete, completions, ttl_s, time.time())

    async def release(self, jobs: list[JobRecord]) -> None:
        await self._run(self._release, [j.id for j in jobs])
        self._event().set()

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._run(self._get, job_id, time.time())

    async def delete(self, job_id: str) -> bool:
        return await self._run(self._delete, job_id, time.time())

    async def recover(self) -> int:
        return await self._run(self._recover)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close_db)
        self._pool.shutdown(wait=True)

    async def counts(self) -> dict[str, int]:
        """Jobs per status (expired ones excluded)."""
        return await self._run(self._counts, time.time())

    # --- plumbing -------------------------------------------------------------------------------

    def _event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise Unavailable("the job store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except RuntimeError as e:  # the pool shut down between the check and the submit
            raise Unavailable(f"the job store is closed: {e}") from None
        except sqlite3.Error as e:
            raise Unavailable(f"the job store failed: {e}") from None

    # --- database thread ------------------------------------------------------------------------

    def _open(self) -> None:
        self._db = open_wal(self.path, _SCHEMA, check_same_thread=False)
        self._purge(time.time())

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _tx(self) -> sqlite3.Connection:
        assert self._db is not None
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def _purge(self, now: float) -> None:
        assert self._db is not None
        self._db.execute("DELETE FROM jobs WHERE expires IS NOT NULL AND expires <= ?", (now,))
        self._purged = now

    def _put(self, job: JobRecord, max_queued: int, now: float) -> tuple[JobRecord, bool]:
        if now - self._purged > _PURGE_EVERY_S:
            self._purge(now)
        db = self._tx()
        try:
            if job.idempotency_key is not None:
                row = db.execute(f"{_SELECT} WHERE model = ? AND idem_key = ?", (job.model, job.idempotency_key)).fetchone()
                if row is not None:
                    found = _row_to_job(row)
                    if found.expires is not None and found.expires <= now:
                        db.execute("DELETE FROM jobs WHERE id = ?", (found.id,))
                    elif found.body_hash != job.body_hash:
                        raise JobConflict(
                            f"Idempotency-Key {job.idempotency_key!r} already names job {found.id} of model "
                            f"{job.model!r}, submitted with a different request"
                        )
                    else:
                        db.execute("COMMIT")
                        return found, False
            (unfinished,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()
            if unfinished >= max_queued:
                raise Overloaded(f"the job queue is full ({unfinished} jobs unfinished, at most {max_queued})", retry_after=5.0)
            db.execute(
                "INSERT INTO jobs (id, model, version, protocol, body, header_length, rows, priority, created, body_hash,"
                " idem_key, callback, status, served_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (job.id, job.model, job.version, job.protocol, job.body, job.header_length, job.rows, job.priority,
                 job.created, job.body_hash, job.idempotency_key, job.callback, job.served_version),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return job, True

    def _claim(self, limit: int, now: float) -> list[JobRecord]:
        db = self._tx()
        try:
            rows = db.execute(
                f"{_SELECT} WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT ?", (limit,)
            ).fetchall()
            jobs = [_row_to_job(r) for r in rows]
            db.executemany("UPDATE jobs SET status = 'running', started = ? WHERE id = ?", [(now, j.id) for j in jobs])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for j in jobs:
            j.status, j.started = "running", now
        return jobs

    def _complete(self, completions: list[Completion], ttl_s: float, now: float) -> list[JobRecord]:
        db = self._tx()
        done: list[JobRecord] = []
        try:
            for c in completions:
                cur = db.execute(
                    "UPDATE jobs SET status = ?, finished = ?, expires = ?, error = ?, result_status = ?,"
                    " result_headers = ?, result_body = ?, served_version = COALESCE(?, served_version),"
                    " started = COALESCE(started, ?), body = x'' WHERE id = ? AND status IN ('queued', 'running')",
                    (c.status, now, now + ttl_s, json.dumps(c.error) if c.error else None, c.result_status,
                     json.dumps(c.result_headers), c.result_body, c.served_version, c.started or now, c.job_id),
                )
                if cur.rowcount:
                    row = db.execute(f"{_SELECT} WHERE id = ? AND callback IS NOT NULL", (c.job_id,)).fetchone()
                    if row is not None:
                        done.append(_row_to_job(row))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return done

    def _release(self, ids: list[str]) -> None:
        db = self._tx()
        try:
            db.executemany("UPDATE jobs SET status = 'queued', started = NULL WHERE id = ? AND status = 'running'", [(i,) for i in ids])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _get(self, job_id: str, now: float) -> JobRecord | None:
        assert self._db is not None
        row = self._db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _row_to_job(row)
        return None if job.expires is not None and job.expires <= now else job

    def _delete(self, job_id: str, now: float) -> bool:
        assert self._db is not None
        cur = self._db.execute("DELETE FROM jobs WHERE id = ? AND (expires IS NULL OR expires > ?)", (job_id, now))
        return cur.rowcount > 0

    def _recover(self) -> int:
        assert self._db is not None
        return self._db.execute("UPDATE jobs SET status = 'queued', started = NULL WHERE status = 'running'").rowcount

    def _counts(self, now: float) -> dict[str, int]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT status, COUNT(*) FROM jobs WHERE expires IS NULL OR expires > ? GROUP BY status", (now,)
        ).fetchall()
        return {status: n for status, n in rows}
