"""Open a SQLite file in WAL mode when several ``tandem serve`` workers may open it at once.

Each worker opens the repository's job store and feedback database as it starts. Switching a
file to WAL takes an exclusive lock, and SQLite answers a second process's switch with
"database is locked" at once instead of waiting in its busy handler, so two workers starting
together could kill one of them. The switch and the schema script are retried here for a
bounded time; every other statement waits through ``busy_timeout`` as usual.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

__all__ = ["open_wal"]

_BUSY_MS = 5000
_OPEN_WINDOW_S = 15.0


def open_wal(path: Path, schema: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode, WAL journal, ``synchronous=FULL``, with ``schema`` applied.

    Raises ``sqlite3.Error`` if the file stays locked for longer than the open window or cannot
    be opened at all.
    """
    deadline = time.monotonic() + _OPEN_WINDOW_S
    pause = 0.005
    while True:
        # connect's timeout is SQLite's busy_timeout for every later statement.
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread,
                             timeout=_BUSY_MS / 1000)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
        except BaseException:
            db.close()
            raise
