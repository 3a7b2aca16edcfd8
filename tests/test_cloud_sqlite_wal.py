"""Workers starting together open the same job store and feedback database: none may lose the race.

Switching a fresh SQLite file to WAL answers a concurrent switch with "database is locked" at
once (no busy wait); with two plain opens racing, about one start in six failed here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import sqlite3
from pathlib import Path

import pytest

from tandem.cloud.feedback import FeedbackStore
from tandem.cloud.job_queue import SqliteJobQueue
from tandem.cloud.sqlite_wal import open_wal  # noqa

_ROUNDS = 40
_PROCESSES = 3


def _open(kind: str, path: str, barrier: multiprocessing.synchronize.Barrier) -> str | None:
    barrier.wait()
    try:
        if kind == "jobs":
            asyncio.run(SqliteJobQueue(Path(path)).close())
        elif kind == "feedback":
            FeedbackStore(Path(path)).close()
        else:
            open_wal(Path(path), "CREATE TABLE IF NOT EXISTS t (a INTEGER); CREATE INDEX IF NOT EXISTS ta ON t (a);").close()
    except Exception as e:  # noqa: BLE001 - the parent asserts on the text
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("kind", ["wal", "jobs", "feedback"])
def test_processes_opening_a_new_database_together_all_succeed(tmp_path: Path, kind: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(_PROCESSES) as pool:
        failures = []
        for i in range(_ROUNDS if kind == "wal" else _ROUNDS // 4):
            barrier = manager.Barrier(_PROCESSES)
            path = str(tmp_path / f"{kind}-{i}" / "store.sqlite3")
            Path(path).parent.mkdir()
            failures += [r for r in pool.starmap(_open, [(kind, path, barrier)] * _PROCESSES) if r]
    assert failures == []


def test_a_file_that_is_not_a_database_is_refused_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "store.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        open_wal(bad, "CREATE TABLE IF NOT EXISTS t (a INTEGER);")
