"""The outbox: order, idempotency, caps with counted drops, persistence across reopen."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tandem.edge.agent.outbox import Outbox, read_stats
from tandem.shared.errors import InvalidInput


def rec(i: int, **kw) -> dict:
    return {"kind": "feedback", "model": "toy", "label": i, **kw}


def test_order_ack_and_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    ids = box.append(rec(i) for i in range(10))
    assert len(set(ids)) == 10 and all(uuid.UUID(i) for i in ids)
    first = box.peek(4)
    assert [r["label"] for _, r in first] == [0, 1, 2, 3]
    assert box.ack(first[-1][0]) == 4
    box.close()
    box = Outbox(tmp_path / "o.sqlite")
    assert [r["label"] for _, r in box.peek(100)] == list(range(4, 10))
    assert [r["id"] for _, r in box.peek(100)] == ids[4:]
    s = read_stats(tmp_path / "o.sqlite")
    assert s is not None and s["depth"] == 6 and s["uploaded"] == 4 and s["appended"] == 10


def test_same_id_is_stored_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    rid = str(uuid.uuid4())
    box.append([rec(1, id=rid)])
    box.append([rec(1, id=rid)])
    assert box.depth() == 1


def test_caps_drop_oldest_and_count_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=5, max_age_s=100)
    now = time.time()
    box.append([rec(i, created_at=now - 500) for i in range(3)], now=now)  # all too old
    box.append([rec(i) for i in range(8)], now=now)
    s = box.stats()
    assert s["dropped_age"] == 3 and s["dropped_full"] == 3 and s["depth"] == 5
    assert [r["label"] for _, r in box.peek(10)] == [3, 4, 5, 6, 7]


def test_route_mix_is_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.append([{"kind": "route", "model": "toy", "payload": {"tier": t}} for t in ("edge", "edge", "cloud", "failed")])
    s = box.stats()
    assert (s["route_edge"], s["route_cloud"], s["route_failed"]) == (2, 1, 1)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"kind": "nope", "model": "toy"}, "kind"),
        ({"kind": "feedback"}, "model"),
        ({"kind": "feedback", "model": "toy", "id": "not-a-uuid"}, "uuid"),
        ({"kind": "feedback", "model": "toy", "created_at": "yesterday"}, "created_at"),
        ({"kind": "feedback", "model": "toy", "payload": [1]}, "payload"),
        ({"kind": "feedback", "model": "toy", "extra": 1}, "extra"),
        ("a string", "map"),
    ],
)
def test_bad_records_are_refused_whole(tmp_path: Path, bad, match: str) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    with pytest.raises(InvalidInput, match=match):
        box.append([rec(0), bad])
    assert box.depth() == 0
