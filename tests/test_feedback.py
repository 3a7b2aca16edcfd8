"""The feedback endpoint over real HTTP on 127.0.0.1 with a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tandem.cloud.feedback import FeedbackStore
from tandem.shared.errors import InvalidInput
from tandem.shared.tensors import packb, unpackb

MSGPACK = "application/msgpack"


def _record(i: int, **over: Any) -> dict[str, Any]:
    rec = {
        "id": str(uuid.uuid4()),
        "kind": ("feedback", "route", "telemetry")[i % 3],
        "model": "toy" if i % 2 else "other",
        "version": "1",
        "request_id": f"req-{i}",
        "label": i % 10,
        "payload": {"i": i, "tier": "edge", "scores": [0.1, 0.9]},
        "created_at": 1_700_000_000.0 + i,
    }
    rec.update(over)
    return rec


async def _post(client: TestClient, records: Any, fmt: str = "json", status: int = 200) -> dict[str, Any]:
    if fmt == "json":
        resp = await client.post("/v1/feedback", data=json.dumps({"records": records}), headers={"Content-Type": "application/json"})
    else:
        resp = await client.post("/v1/feedback", data=packb({"records": records}), headers={"Content-Type": MSGPACK})
    assert resp.status == status, await resp.read()
    if fmt == "json":
        assert resp.content_type == "application/json"
        return await resp.json()
    assert resp.content_type == MSGPACK
    return unpackb(await resp.read())


async def _list_all(client: TestClient, limit: int, **params: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    for _ in range(10_000):  # bounded: a paging bug fails the test instead of hanging it
        resp = await client.get("/v1/feedback", params={**params, "limit": str(limit), "after": str(after)})
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        if not doc["records"]:
            assert doc["next_after"] is None
            return out
        assert len(doc["records"]) <= limit
        out += doc["records"]
        after = doc["next_after"]
    raise AssertionError("paging never ended")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "feedback.sqlite"


@pytest.fixture
async def served(db_path: Path) -> AsyncIterator[tuple[TestClient, FeedbackStore]]:
    store = FeedbackStore(db_path, max_body_bytes=256 * 1024)
    app = web.Application()
    store.add_routes(app)
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            yield c, store
    finally:
        store.close()


async def test_thousand_records_in_batches_deduplicated_and_ordered(served, db_path: Path) -> None:
    client, store = served
    records = [_record(i) for i in range(1000)]
    batches = [records[i : i + 100] for i in range(0, 1000, 100)]
    for n, batch in enumerate(batches):
        assert await _post(client, batch, "msgpack" if n % 2 else "json") == {"accepted": 100, "duplicates": 0}

    # A client retrying an upload whose answer it lost: nothing is stored twice.
    assert await _post(client, batches[3], "msgpack") == {"accepted": 0, "duplicates": 100}
    # Partly new, partly old, and one repeated inside the batch itself.
    extra = _record(1000)
    assert await _post(client, [batches[0][0], extra, extra]) == {"accepted": 1, "duplicates": 2}
    # The same id in another spelling (upper case) is the same idempotency key.
    assert await _post(client, [dict(extra, id=extra["id"].upper())]) == {"accepted": 0, "duplicates": 1}

    stored = await _list_all(client, limit=128)
    assert [r["id"] for r in stored] == [r["id"] for r in records + [extra]]
    seqs = [r["seq"] for r in stored]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    first = stored[1]
    assert {k: first[k] for k in records[1]} == records[1]
    assert first["received_at"] >= time.time() - 60

    toys = await _list_all(client, limit=1000, model="toy", kind="route")
    assert toys and all(r["model"] == "toy" and r["kind"] == "route" for r in toys)
    assert [r["id"] for r in toys] == [r["id"] for r in records if r["model"] == "toy" and r["kind"] == "route"]

    resp = await client.get("/v1/feedback", params={"limit": "3"}, headers={"Accept": MSGPACK})
    assert resp.content_type == MSGPACK and len(unpackb(await resp.read())["records"]) == 3

    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM feedback").fetchone()[0] == 1001


async def test_concurrent_retries_store_once(served) -> None:
    client, _ = served
    batch = [_record(i) for i in range(50)]
    answers = await asyncio.gather(*(_post(client, batch) for _ in range(8)))
    assert sum(a["accepted"] for a in answers) == 50
    assert sum(a["duplicates"] for a in answers) == 7 * 50
    assert len(await _list_all(client, limit=1000)) == 50


def _bad_cases() -> list[tuple[Any, str]]:
    ok = _record(0)
    without = lambda k: {x: v for x, v in ok.items() if x != k}  # noqa: E731
    return [
        ([ok, dict(_record(1), id="not-a-uuid")], "records[1].id: 'not-a-uuid' is not a UUID"),
        ([dict(ok, id=12)], "records[0].id: must be a UUID string"),
        ([without("id")], "records[0].id: is required"),
        ([without("created_at")], "records[0].created_at: is required"),
        ([without("model")], "records[0].model: is required"),
        ([dict(ok, kind="label")], "records[0].kind: must be one of feedback, route, telemetry"),
        ([dict(ok, model="")], "records[0].model: must be a non-empty string"),
        ([dict(ok, model=7)], "records[0].model: must be a non-empty string, not int"),
        ([dict(ok, version=1)], "records[0].version: must be a string, not int"),
        ([dict(ok, request_id=["r"])], "records[0].request_id: must be a string, not list"),
        ([dict(ok, created_at="yesterday")], "records[0].created_at: must be unix seconds"),
        ([dict(ok, created_at=True)], "records[0].created_at: must be unix seconds"),
        ([dict(ok, created_at=float("inf"))], "records[0].created_at: must be unix seconds"),
        ([dict(ok, payload=[1, 2])], "records[0].payload: must be a map, not list"),
        ([dict(ok, colour="red")], "records[0].colour: unknown field"),
        ([ok, _record(1), "oops"], "records[2] must be a map, not str"),
        ({"a": 1}, "'records' must be a list, not dict"),
    ]


@pytest.mark.parametrize("records, message", _bad_cases())
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_malformed_records_are_refused_whole_with_a_message(served, records, message: str, fmt: str) -> None:
    client, _ = served
    body = await _post(client, records, fmt, status=400)
    assert body["code"] == "invalid_input"
    assert message in body["error"], body
    assert await _list_all(client, limit=100) == []  # nothing of a refused batch is stored


async def test_bad_bodies_and_queries(served) -> None:
    client, _ = served

    async def expect(resp, status: int, words: str) -> None:
        assert resp.status == status, await resp.text()
        body = await resp.json()
        assert words in body["error"] and body["code"], body

    await expect(await client.post("/v1/feedback", data=b"{nope", headers={"Content-Type": "application/json"}), 400, "not valid JSON")
    await expect(await client.post("/v1/feedback", data=b"[]", headers={"Content-Type": "application/json"}), 400, "'records' list")
    await expect(await client.post("/v1/feedback", data=b'{"records": [], "x": 1}', headers={"Content-Type": "application/json"}), 400, "unknown field(s) in the feedback body: x")
    await expect(await client.post("/v1/feedback", data=b"records", headers={"Content-Type": "text/plain"}), 415, "Content-Type must be")
    await expect(await client.post("/v1/feedback", data=b"x" * (300 * 1024), headers={"Content-Type": "application/json"}), 413, "exceeds the limit")
    # A body with no Content-Length (chunked) is cut off at the limit too.

    async def chunks():
        for _ in range(40):
            yield b"x" * 8192

    await expect(await client.post("/v1/feedback", data=chunks(), headers={"Content-Type": "application/json"}), 413, "exceeds the limit")
    resp = await client.post("/v1/feedback", data=b"\xc1\xc1", headers={"Content-Type": MSGPACK})
    assert resp.status == 400 and "malformed msgpack" in unpackb(await resp.read())["error"]
    # bytes are not JSON: refused instead of stored in a form the JSON listing cannot give back.
    resp = await client.post("/v1/feedback", data=packb({"records": [_record(0, label=b"\x00")]}), headers={"Content-Type": MSGPACK})
    assert resp.status == 400 and "records[0].label: must hold only JSON values" in unpackb(await resp.read())["error"]

    await expect(await client.get("/v1/feedback", params={"limit": "lots"}), 400, "'limit' must be an integer")
    await expect(await client.get("/v1/feedback", params={"limit": "0"}), 400, "'limit' must be between 1 and 1000")
    await expect(await client.get("/v1/feedback", params={"after": "-1"}), 400, "'after' must be between 0")
    await expect(await client.get("/v1/feedback", params={"kind": "x"}), 400, "kind must be one of")
    await expect(await client.get("/v1/feedback", params={"modle": "toy"}), 400, "unknown query parameter(s): modle")


async def test_database_survives_close_and_reopen(db_path: Path) -> None:
    records = [_record(i) for i in range(20)]
    store = FeedbackStore(db_path)
    assert await store.add(records) == (20, 0)
    store.close()
    store.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        await store.add([_record(99)])

    again = FeedbackStore(db_path)
    try:
        assert await again.add(records[:5] + [_record(20)]) == (1, 5)
        app = web.Application()
        again.add_routes(app)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            stored = await _list_all(client, limit=7)
        assert [r["id"] for r in stored][:20] == [r["id"] for r in records]
        assert len(stored) == 21
    finally:
        again.close()


def test_unusable_database_path_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="the feedback store .*feedback.sqlite cannot be opened"):
        FeedbackStore(tmp_path / "file" / "feedback.sqlite")


async def test_everything_an_edge_outbox_accepts_the_cloud_stores(served) -> None:
    """A record the device queued but the cloud refuses would block the device's upload queue for
    good, so the cloud accepts at least what the agent's outbox accepts."""
    from tandem.edge.agent.outbox import validate_record

    client, _ = served
    edge_cases = [
        {"kind": "feedback", "model": "toy", "label": 3},
        {"kind": "route", "model": "toy", "version": "", "request_id": "", "created_at": -1.5},
        {"kind": "telemetry", "model": "m" * 1000, "request_id": "r" * 5000, "payload": {"nan": float("nan"), "inf": float("inf")}},
        {"kind": "feedback", "model": "toy", "id": str(uuid.uuid4()).upper(), "label": {"nested": [1, None, True, "x"]}},
        {"kind": "feedback", "model": "toy", "created_at": 0, "payload": {}},
    ]
    queued = [validate_record(r) for r in edge_cases]
    # The agent uploads with aiohttp's json= (json.dumps defaults), as here.
    assert await _post(client, queued) == {"accepted": len(queued), "duplicates": 0}
    assert await _post(client, queued) == {"accepted": 0, "duplicates": len(queued)}
    stored = await _list_all(client, limit=100)
    assert [r["request_id"] for r in stored][:2] == [None, ""]
    assert stored[2]["payload"]["inf"] == float("inf")
