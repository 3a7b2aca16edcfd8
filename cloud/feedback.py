"""Feedback store: labels, routing decisions and telemetry sent back by clients, kept for retraining.

::

    POST /v1/feedback   {"records": [{"id": uuid, "kind": "feedback"|"route"|"telemetry"|"profile", "model": str,
                                      "version"?: str, "request_id"?: str, "label"?: any,
                                      "payload"?: map, "created_at": unix seconds}]}
                        -> {"accepted": n, "duplicates": m}
    GET  /v1/feedback?model=&kind=&limit=&after=<seq>
                        -> {"records": [... each with "seq" and "received_at"], "next_after": seq|null}

Bodies are JSON or msgpack by ``Content-Type`` and answered in the same format (``Accept`` for GET).
A batch is validated whole before anything is written: one bad record refuses the batch with a 400
naming the record index and field, so a client can fix and resend it. ``id`` is the idempotency key
(``INSERT OR IGNORE``): a retried upload is counted as duplicates and never stored twice.

Storage is an embedded SQLite database in WAL mode with ``synchronous=FULL`` (an "accepted" answer
means the rows are on disk). Every database call runs on one dedicated thread: SQLite wants a single
writer, and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from tandem.shared.errors import InvalidInput, TandemError, Unavailable
from tandem.shared.protocol import CONTENT_TYPE as MSGPACK
from tandem.shared.tensors import packb, unpackb

from .body import read_raw
from .sqlite_wal import open_wal

__all__ = ["FeedbackStore", "KINDS"]

PATH = "/v1/feedback"
KINDS = ("feedback", "route", "telemetry", "profile")
DEFAULT_MAX_BODY_BYTES = 8 << 20
MAX_RECORDS_PER_REQUEST = 10_000
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
#: Deepest nesting of lists and maps a label or payload may have. Stored as JSON and read back
#: into responses, a deeper one (~1000 levels) exceeds the JSON codec's recursion limit.
MAX_NESTING = 64
#: Largest ``after`` sequence number (SQLite's INTEGER is 64-bit signed).
_MAX_SEQ = 2**63 - 1
_FIELDS = {"id", "kind", "model", "version", "request_id", "label", "payload", "created_at"}
_JSON = "application/json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    model       TEXT NOT NULL,
    version     TEXT,
    request_id  TEXT,
    label       TEXT,
    payload     TEXT,
    created_at  REAL NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_model_seq ON feedback (model, seq);
"""
_COLUMNS = ("seq", "id", "kind", "model", "version", "request_id", "label", "payload", "created_at", "received_at")

T = TypeVar("T")


class UnsupportedMediaType(TandemError):
    status = 415
    code = "unsupported_media_type"


class FeedbackStore:
    """SQLite-backed feedback records behind ``POST/GET /v1/feedback``. Call :meth:`close` when done."""

    def __init__(self, db_path: Path, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout_s: float = 60.0) -> None:
        self.db_path = Path(db_path)
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-feedback")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        # Open on the DB thread now, so a bad path fails the server's start, not the first upload.
        try:
            self._pool.submit(self._open).result()
        except (OSError, sqlite3.Error) as e:
            self._pool.shutdown(wait=True)
            raise InvalidInput(f"the feedback store {self.db_path} cannot be opened: {e}") from None
        except BaseException:
            self._pool.shutdown(wait=True)
            raise

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self._post)
        app.router.add_get(PATH, self._get)

    def close(self) -> None:
        """Finish every accepted write, then close the database. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._pool.submit(self._close_db).result()
        self._pool.shutdown(wait=True)

    # --- Python API (also used by the handlers) -------------------------------------------------

    async def add(self, records: list[dict[str, Any]]) -> tuple[int, int]:
        """Validate and store records; returns (accepted, duplicates). Nothing is stored on error."""
        rows = [_validate(r, i) for i, r in enumerate(_as_record_list(records))]
        accepted = await self._run(self._insert, rows)
        return accepted, len(rows) - accepted

    async def query(
        self, *, model: str | None = None, kind: str | None = None, after: int = 0, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[dict[str, Any]]:
        """Stored records in insertion order with ``seq > after``."""
        return await self._run(self._select, model, kind, after, limit)

    # --- handlers -------------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        as_msgpack = False
        try:
            as_msgpack = _is_msgpack(request.content_type)
            body = await read_raw(request, self.max_body_bytes, self.read_timeout_s)
            doc = unpackb(body) if as_msgpack else _json_loads(body)
            if not isinstance(doc, Mapping) or "records" not in doc:
                raise InvalidInput("feedback body must be a map with a 'records' list")
            if set(doc) - {"records"}:
                raise InvalidInput(f"unknown field(s) in the feedback body: {', '.join(sorted(map(str, set(doc) - {'records'})))}")
            accepted, duplicates = await self.add(doc["records"])
        except TandemError as e:
            return _respond(e.to_dict(), as_msgpack, e.status)
        return _respond({"accepted": accepted, "duplicates": duplicates}, as_msgpack)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        as_msgpack = MSGPACK in request.headers.get("Accept", "")
        try:
            q = request.query
            unknown = set(q) - {"model", "kind", "limit", "after"}
            if unknown:
                raise InvalidInput(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
            kind = q.get("kind")
            if kind is not None and kind not in KINDS:
                raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
            limit = _int_param(q, "limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
            after = _int_param(q, "after", 0, 0, _MAX_SEQ)
            records = await self.query(model=q.get("model"), kind=kind, after=after, limit=limit)
        except TandemError as e:
            return _respond(e.to_dict(), as_msgpack, e.status)
        next_after = records[-1]["seq"] if records else None
        return _respond({"records": records, "next_after": next_after}, as_msgpack)

    # --- database thread ------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise Unavailable("the feedback store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except RuntimeError as e:  # the pool was shut down between the check and the submit
            raise Unavailable(f"the feedback store is closed: {e}") from None
        except sqlite3.Error as e:
            raise Unavailable(f"the feedback database failed: {e}") from None

    def _open(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_wal(self.db_path, _SCHEMA)

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        assert self._db is not None
        db = self._db
        before = db.total_changes
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO feedback (id, kind, model, version, request_id, label, payload, created_at, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return db.total_changes - before

    def _select(self, model: str | None, kind: str | None, after: int, limit: int) -> list[dict[str, Any]]:
        assert self._db is not None
        sql = f"SELECT {', '.join(_COLUMNS)} FROM feedback WHERE seq > ?"
        args: list[Any] = [after]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        out = []
        for row in self._db.execute(sql, args):
            rec = dict(zip(_COLUMNS, row))
            rec["label"] = json.loads(rec["label"]) if rec["label"] is not None else None
            rec["payload"] = json.loads(rec["payload"]) if rec["payload"] is not None else None
            out.append(rec)
        return out


# --- validation ---------------------------------------------------------------------------------


def _as_record_list(records: Any) -> list[Any]:
    if not isinstance(records, list):
        raise InvalidInput(f"'records' must be a list, not {type(records).__name__}")
    if len(records) > MAX_RECORDS_PER_REQUEST:
        raise InvalidInput(f"{len(records)} records in one request; send at most {MAX_RECORDS_PER_REQUEST} per request")
    return records


def _bad(index: int, field: str, problem: str) -> InvalidInput:
    return InvalidInput(f"records[{index}].{field}: {problem}", index=index, field=field)


def _validate(rec: Any, i: int) -> tuple[Any, ...]:
    """One record -> a row for the insert, or InvalidInput naming the record and the field."""
    if not isinstance(rec, Mapping):
        raise InvalidInput(f"records[{i}] must be a map, not {type(rec).__name__}", index=i)
    unknown = set(rec) - _FIELDS
    if unknown:
        raise _bad(i, sorted(map(str, unknown))[0], f"unknown field (allowed: {', '.join(sorted(_FIELDS))})")
    for required in ("id", "kind", "model", "created_at"):
        if required not in rec:
            raise _bad(i, required, "is required")

    rid = rec["id"]
    if not isinstance(rid, str):
        raise _bad(i, "id", f"must be a UUID string, not {type(rid).__name__}")
    try:
        # Canonical form, so that "ABC…" and "abc…" are one idempotency key.
        rid = str(uuid.UUID(rid))
    except ValueError:
        raise _bad(i, "id", f"{rid[:64]!r} is not a UUID") from None
    if rec["kind"] not in KINDS:
        raise _bad(i, "kind", f"must be one of {', '.join(KINDS)}, not {_short(rec['kind'])}")
    model = _string(rec, "model", i, required=True)
    version = _string(rec, "version", i)
    request_id = _string(rec, "request_id", i)

    created = rec["created_at"]
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not _finite(created):
        raise _bad(i, "created_at", f"must be unix seconds (a finite number), not {_short(created)}")

    payload = rec.get("payload")
    if payload is not None and not isinstance(payload, Mapping):
        raise _bad(i, "payload", f"must be a map, not {type(payload).__name__}")
    label = _to_json(rec.get("label"), i, "label") if rec.get("label") is not None else None
    payload_json = _to_json(payload, i, "payload") if payload is not None else None
    return (rid, rec["kind"], model, version, request_id, label, payload_json, float(created), time.time())


def _string(rec: Mapping[str, Any], field: str, i: int, required: bool = False) -> str | None:
    # No length cap beyond the body limit: edge outboxes accept any string, and a record the cloud
    # refused would block a device's upload queue for good.
    v = rec.get(field)
    if v is None and not required:
        return None
    if not isinstance(v, str) or (required and not v):
        raise _bad(i, field, f"must be a {'non-empty ' if required else ''}string, not {type(v).__name__}")
    if not _utf8(v):
        raise _bad(i, field, "must be valid Unicode (it holds a lone surrogate, e.g. an unpaired \\ud800 escape)")
    return v


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int beyond any float
        return False


def _short(value: Any) -> str:
    """A value for an error message, cut to a readable length."""
    if isinstance(value, int) and value.bit_length() >= 1000:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _check_value(value: Any, i: int, field: str) -> None:
    """Refuse a label or payload that could not be stored and read back in both wire formats:
    nested deeper than MAX_NESTING, or holding a string that is not valid Unicode (msgpack
    cannot encode it). Walks without recursion, so no depth can exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not _utf8(v):
                raise _bad(i, field, "holds a string that is not valid Unicode (a lone surrogate)")
            continue
        if isinstance(v, Mapping):
            children: list[Any] = [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple)):
            children = list(v)
        else:
            continue
        if depth > MAX_NESTING:
            raise _bad(i, field, f"is nested more than {MAX_NESTING} levels deep")
        stack.extend((c, depth + 1) for c in children)


def _to_json(value: Any, i: int, field: str) -> str:
    # Stored as JSON so that every record reads back the same in either wire format.
    _check_value(value, i, field)
    try:
        # NaN/Infinity pass (as Python's json writes and reads them): devices serialise with defaults.
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise _bad(i, field, f"must hold only JSON values (null, bool, number, string, list, map with string keys): {e}") from None


# --- wire ---------------------------------------------------------------------------------------


def _is_msgpack(content_type: str) -> bool:
    if content_type == MSGPACK:
        return True
    if content_type == _JSON:
        return False
    raise UnsupportedMediaType(f"Content-Type must be {_JSON} or {MSGPACK}, not {content_type!r}")


def _json_loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also an integer of too many digits
        raise InvalidInput(f"feedback body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidInput("feedback body is nested too deeply") from None


def _int_param(q: Mapping[str, str], name: str, default: int, lo: int, hi: int | None) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be an integer, not {raw!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise InvalidInput(f"query parameter {name!r} must be between {lo} and {hi if hi is not None else 'any'}, not {v}")
    return v


def _respond(doc: Any, as_msgpack: bool, status: int = 200) -> web.Response:
    if as_msgpack:
        return web.Response(body=packb(doc), status=status, content_type=MSGPACK)
    return web.json_response(doc, status=status)
