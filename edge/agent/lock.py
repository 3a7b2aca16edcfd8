"""One agent per data directory: an exclusive ``flock`` on ``DATA/agent.lock`` held for the process's life.

Two agents on one data directory would take over each other's socket, runtime file and store. The
kernel drops the lock when its holder dies, so a killed agent never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from tandem.shared.errors import TandemError

#: Held (flock) by the running agent for its whole life; holds its pid for the message a second one prints.
LOCK_NAME = "agent.lock"
#: How long a starting agent retries the lock: ``tandem agent status`` holds it shared for an instant.
_LOCK_WAIT_S = 1.0


class AgentAlreadyRunning(TandemError):
    status = 409
    code = "agent_running"


class DataDirLock:
    """An exclusive ``flock`` on ``DATA/agent.lock`` for the life of the process that holds it.

    Two agents on one data directory would take over each other's socket, runtime file and store;
    the kernel drops the lock when the process dies, so a killed agent never leaves a stale lock.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the pid in it belongs to the holder until this process has the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    pid = read_lock_pid(self.path)
                    raise AgentAlreadyRunning(
                        f"another agent (pid {pid if pid is not None else 'unknown'}) is already running on the "
                        f"data directory {self.path.parent.resolve()}; stop it first or give this one another data_dir"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def read_lock_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def lock_holder(data_dir: Path) -> int | None:
    """The pid of the agent holding ``data_dir``'s lock (0 if it has not written it yet), else None.

    Probed with a shared lock released at once; a starting agent retries its exclusive lock for
    longer than that, so asking never makes one fail.
    """
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_lock_pid(path) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
