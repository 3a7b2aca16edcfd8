"""Store-and-forward: a bounded outbox in SQLite for route records, telemetry, feedback and deferred jobs.

Records follow the cloud's feedback contract (``{"id", "kind", "model", "version"?, "request_id"?,
"label"?, "payload"?, "created_at"}``). Each gets a uuid ``id`` on append, the cloud's idempotency key,
so a batch re-sent after a crash between upload and delete is never stored twice. Records leave in
insertion order and are deleted only once the cloud acknowledged them. The outbox is capped by row
count and age; what a cap drops is counted (persisted) and reported, never silently lost.

A ``job`` record is an inference job an app deferred while the cloud was unreachable
(:mod:`tandem.edge.jobs`): its ``id`` is the job's id, which the uploader sends as the
``Idempotency-Key`` of the submit, so a submit retried after a crash never makes a second job. Its
payload is ``{"body": base64 of the native msgpack request, "priority"?: 0..9, "callback"?: url}``.

WAL mode lets ``tandem agent status`` read while the agent writes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tandem.shared.errors import InvalidInput

KINDS = ("feedback", "route", "telemetry", "job", "profile")
#: A job record's model and version become a URL path on the cloud: plain names only.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_JOB_PAYLOAD = {"body", "priority", "callback"}
_FIELDS = {"id", "kind", "model", "version", "request_id", "label", "payload", "created_at"}
_COUNTERS = ("appended", "uploaded", "dropped_full", "dropped_age", "dropped_refused", "route_edge", "route_cloud", "route_failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    body       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def validate_record(rec: Any) -> dict[str, Any]:
    """A copy of ``rec`` that matches the feedback contract (id and created_at filled in), or InvalidInput."""
    if not isinstance(rec, Mapping):
        raise InvalidInput("each record must be a map")
    unknown = set(rec) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown record field(s): {', '.join(sorted(map(str, unknown)))}")
    out = dict(rec)
    if out.get("kind") not in KINDS:
        raise InvalidInput(f"record 'kind' must be one of {', '.join(KINDS)}; got {out.get('kind')!r}")
    if not isinstance(out.get("model"), str) or not out["model"]:
        raise InvalidInput("record 'model' must be a non-empty string")
    for key in ("version", "request_id"):
        if out.get(key) is not None and not isinstance(out[key], str):
            raise InvalidInput(f"record {key!r} must be a string")
    if out.get("payload") is not None and not isinstance(out["payload"], Mapping):
        raise InvalidInput("record 'payload' must be a map")
    rid = out.get("id")
    if rid is None:
        out["id"] = str(uuid.uuid4())
    else:
        try:
            uuid.UUID(str(rid))
        except ValueError:
            raise InvalidInput(f"record 'id' {rid!r} is not a uuid") from None
        out["id"] = str(rid)
    if out["kind"] == "job":
        _validate_job(out)
    ts = out.get("created_at")
    if ts is None:
        out["created_at"] = time.time()
    elif isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise InvalidInput("record 'created_at' must be unix seconds (a number)")
    else:
        out["created_at"] = float(ts)
    try:
        json.dumps(out)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"record is not JSON-serialisable: {e}") from None
    return out


def _validate_job(rec: dict[str, Any]) -> None:
    """A job record's extra rules: a plain model (and version) name, a base64 msgpack body, a
    priority in the job range and an http(s) callback (see :mod:`tandem.shared.jobs`)."""
    from tandem.shared.jobs import check_callback_url, parse_priority

    for key in ("model", "version"):
        v = rec.get(key)
        if v is not None and not _PLAIN_NAME.fullmatch(v):
            raise InvalidInput(f"job record {key!r} must be a plain name ([A-Za-z0-9._-], up to 128), got {v[:40]!r}")
    payload = rec.get("payload")
    if not isinstance(payload, Mapping) or not isinstance(payload.get("body"), str):
        raise InvalidInput("job record 'payload' must hold 'body': the base64 of the native msgpack request")
    unknown = set(payload) - _JOB_PAYLOAD
    if unknown:
        raise InvalidInput(f"unknown job payload field(s): {', '.join(sorted(map(str, unknown)))}")
    try:
        if not base64.b64decode(payload["body"], validate=True):
            raise InvalidInput("job record body is empty")
    except (binascii.Error, ValueError):
        raise InvalidInput("job record 'body' is not base64") from None
    priority = payload.get("priority")
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidInput("job record 'priority' must be an integer")
        parse_priority(str(priority))
    check_callback_url(payload.get("callback"))


class Outbox:
    """Thread-safe (one connection behind a lock: calls are short and the agent has one writer)."""

    def __init__(self, path: str | os.PathLike[str], max_rows: int = 100_000, max_age_s: float = 7 * 86400.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (not a power cut), at a fraction of FULL's cost.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, records: Iterable[Mapping[str, Any]], now: float | None = None) -> list[str]:
        """Validate and store records in order; returns their ids. Enforces the caps afterwards."""
        rows = [validate_record(r) for r in records]
        if not rows:
            return []
        routes = {"edge": 0, "cloud": 0, "failed": 0}
        for r in rows:
            if r["kind"] == "route":
                tier = (r.get("payload") or {}).get("tier")
                routes[tier if tier in ("edge", "cloud") else "failed"] += 1
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany(
                    "INSERT OR IGNORE INTO records (id, created_at, body) VALUES (?, ?, ?)",
                    [(r["id"], r["created_at"], json.dumps(r, separators=(",", ":"))) for r in rows],
                )
                self._bump("appended", cur.rowcount)
                for tier, n in routes.items():
                    self._bump(f"route_{tier}", n)
                self._enforce_caps(time.time() if now is None else now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [r["id"] for r in rows]

    def peek(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """The oldest ``limit`` records as (seq, record), in insertion order."""
        with self._lock:
            rows = self._db.execute("SELECT seq, body FROM records ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [(seq, json.loads(body)) for seq, body in rows]

    def ack(self, up_to_seq: int) -> int:
        """Delete everything up to and including ``up_to_seq`` (the cloud has it). Returns rows deleted."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            n = self._db.execute("DELETE FROM records WHERE seq <= ?", (up_to_seq,)).rowcount
            self._bump("uploaded", n)
            self._db.execute("COMMIT")
        return n

    def reject(self, seq: int) -> None:
        """Delete one record the cloud refused as malformed (it would block the queue forever); counted."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            if self._db.execute("DELETE FROM records WHERE seq = ?", (seq,)).rowcount:
                self._bump("dropped_refused", 1)
            self._db.execute("COMMIT")

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = _stats(self._db)
        out.update(max_rows=self.max_rows, max_age_s=self.max_age_s)
        return out

    def enforce_caps(self, now: float | None = None) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._enforce_caps(time.time() if now is None else now)
            self._db.execute("COMMIT")

    # Called with the lock held, inside a transaction.
    def _enforce_caps(self, now: float) -> None:
        old = self._db.execute("DELETE FROM records WHERE created_at < ?", (now - self.max_age_s,)).rowcount
        self._bump("dropped_age", old)
        (count,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
        excess = count - self.max_rows
        if excess > 0:
            # The oldest go first: the newest records describe the device's current state. Deferred
            # jobs are work an app handed over, not a report: they go only if nothing else is left.
            n = self._db.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records "
                "WHERE json_extract(body, '$.kind') IS NOT 'job' ORDER BY seq LIMIT ?)", (excess,)
            ).rowcount
            if n < excess:
                self._db.execute(
                    "DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT ?)", (excess - n,)
                )
            self._bump("dropped_full", excess)

    def _bump(self, name: str, n: int) -> None:
        if n > 0:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )


def read_stats(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Outbox stats from another process (``tandem agent status``), or None if there is no outbox."""
    p = Path(path)
    if not p.exists():
        return None
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10)
    try:
        return _stats(db)
    finally:
        db.close()


def _stats(db: sqlite3.Connection) -> dict[str, Any]:
    depth, oldest = db.execute("SELECT COUNT(*), MIN(created_at) FROM records").fetchone()
    counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
    out: dict[str, Any] = {"depth": int(depth), "oldest_created_at": oldest}
    out.update({c: int(counters.get(c, 0)) for c in _COUNTERS})
    return out
