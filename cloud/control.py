"""Model load/unload that reaches every worker of ``tandem serve --workers N``.

One worker receives ``POST /v2/repository/models/{m}/load`` (or ``unload``): the kernel picked it
for the connection. Applying it there alone would leave the workers serving different models, so
the change goes through the supervisor, over the stdio lines the two already share (workers.py):

1. the worker sends ``tandem-control {"id", "op", "model"}`` to the supervisor;
2. the supervisor sends ``apply {"id", "op", "model"}`` to every worker, the first one included,
   in one order for all, and remembers which models stand unloaded;
3. each worker applies the changes it is sent one at a time, in that order, and answers
   ``tandem-applied {"id", "ok", "status", "code", "error"}``;
4. once every worker has answered, the supervisor sends ``result {"id", "results"}`` to the first
   worker, which answers the HTTP request: 200 when all succeeded, else the first failure's
   status and message, naming the worker. A worker that dies before answering counts as done:
   its replacement starts from the repository on disk and the remembered unloads.

A worker that starts (or restarts) is sent the remembered unloads before ``go``, and applies them
before it reports ready, so it never serves a model the others have unloaded. Loads need no
replay: a starting worker loads every model on disk.

With one process, :class:`~tandem.cloud.repository.ModelRepository` itself is the control.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem.shared.errors import InvalidInput, TandemError, Unavailable, error_from_body

__all__ = ["ModelControl", "WorkerControl", "Broadcasts", "CONTROL", "APPLIED", "CONTROL_TIMEOUT_S"]

#: Line prefixes a worker writes to the supervisor (its other stdout lines are for people).
CONTROL = "tandem-control "
APPLIED = "tandem-applied "
#: How long a worker waits for every worker to apply a change (loads build and warm sessions).
CONTROL_TIMEOUT_S = 600.0
_OPS = ("load", "unload")
_log = logging.getLogger("tandem.cloud.control")


class ModelControl(Protocol):
    async def load(self, name: str) -> Any: ...

    async def unload(self, name: str) -> Any: ...


# --- worker side -----------------------------------------------------------------------------------


class WorkerControl:
    """A worker's model control: every change goes through the supervisor to every worker.

    Create on the worker's event loop; feed it each line the supervisor sends (:meth:`command`)."""

    def __init__(
        self, local: ModelControl, send: Callable[[str], None], on_go: Callable[[], None], *,
        timeout_s: float = CONTROL_TIMEOUT_S,
    ) -> None:
        self._local = local
        self._send = send
        self._on_go = on_go
        self._timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        # Changes and "go" run in the order the supervisor sent them, one at a time.
        self._queue: asyncio.Queue[tuple[str, dict[str, Any] | None]] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._draining = False

    async def load(self, name: str) -> None:
        await self._everywhere("load", name)

    async def unload(self, name: str) -> None:
        await self._everywhere("unload", name)

    def command(self, line: str) -> None:
        """One line from the supervisor (on the loop): ``go``, ``apply {...}`` or ``result {...}``."""
        kind, _, payload = line.partition(" ")
        try:
            doc = json.loads(payload) if payload else None
        except ValueError:
            _log.error("ignoring a malformed line from the supervisor: %r", line[:200])
            return
        if kind == "result" and isinstance(doc, dict):
            fut = self._waiting.get(doc.get("id", ""))
            if fut is not None and not fut.done():
                fut.set_result(list(doc.get("results") or []))
        elif kind == "go" or (kind == "apply" and isinstance(doc, dict)):
            self._queue.put_nowait((kind, doc))
        else:
            _log.error("ignoring an unknown line from the supervisor: %r", line[:200])

    def drain(self) -> None:
        """The server is shutting down: refuse new changes, and stop waiting for the workers on
        those in progress (their requests answer 503 at once instead of holding the drain up to
        the shutdown timeout). This worker still applies what the supervisor sends it."""
        self._draining = True
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(Unavailable("the server is shutting down; the change may have reached some workers"))

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _everywhere(self, op: str, name: str) -> None:
        if self._draining:
            raise Unavailable(f"{op} of model {name!r}: the server is shutting down")
        rid = f"{os.getpid()}-{next(self._ids)}"
        fut: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self._send(CONTROL + json.dumps({"id": rid, "op": op, "model": name}))
            results = await asyncio.wait_for(fut, self._timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"{op} of model {name!r}: not every worker answered within {self._timeout_s:.0f} s; see the server log"
            ) from None
        finally:
            self._waiting.pop(rid, None)
        failed = [r for r in results if not r.get("ok")]
        if failed:
            first = failed[0]
            more = f" ({len(failed)} of {len(results)} workers failed)" if len(failed) > 1 else ""
            message = f"worker {first.get('worker', '?')}: {first.get('error', 'failed')}{more}"
            raise error_from_body(int(first.get("status", 500)), {"error": message, "code": first.get("code", "internal")})

    async def _run(self) -> None:
        while True:
            kind, doc = await self._queue.get()
            if kind == "go":
                self._on_go()
                continue
            assert doc is not None
            self._send(APPLIED + json.dumps({"id": doc.get("id"), **await self._apply(doc)}))

    async def _apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        op, name = doc.get("op"), doc.get("model")
        try:
            if op not in _OPS or not isinstance(name, str):
                raise InvalidInput(f"unknown model control {op!r} for {name!r}")
            await (self._local.load(name) if op == "load" else self._local.unload(name))
            return {"ok": True}
        except TandemError as e:
            return {"ok": False, "status": e.status, "code": e.code, "error": e.message}
        except Exception as e:  # noqa: BLE001 - the worker must answer, whatever happened
            _log.exception("model %s of %r failed", op, name)
            return {"ok": False, "status": 500, "code": "internal", "error": f"internal error: {type(e).__name__}"}


# --- supervisor side -------------------------------------------------------------------------------


@dataclass
class _Change:
    origin: tuple[int, int]  # (worker index, pid) that asked
    waiting: dict[int, int]  # worker index -> pid, not answered yet
    results: list[dict[str, Any]] = field(default_factory=list)


class Broadcasts:
    """The supervisor's bookkeeping of model changes: what to send to whom, and when.

    Methods return ``(worker index, pid, line)`` triples for the supervisor to write."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._changes: dict[str, _Change] = {}
        #: Models standing unloaded, in the order they were unloaded: replayed to starting workers.
        self.unloaded: list[str] = []

    def request(self, index: int, pid: int, line: str, alive: dict[int, int]) -> list[tuple[int, int, str]]:
        """A worker's ``tandem-control`` line; ``alive`` maps index -> pid of every running worker."""
        try:
            doc = json.loads(line[len(CONTROL):])
            rid, op, model = doc["id"], doc["op"], doc["model"]
            if op not in _OPS or not isinstance(model, str) or not isinstance(rid, str):
                raise ValueError(op)
        except (ValueError, KeyError, TypeError):
            _log.error("worker %d sent a malformed control line: %r", index + 1, line[:200])
            return []
        if op == "unload" and model not in self.unloaded:
            self.unloaded.append(model)
        elif op == "load" and model in self.unloaded:
            self.unloaded.remove(model)
        self._changes[rid] = _Change((index, pid), dict(alive))
        _log.info("model %s of %r asked by worker %d/%d: applying it on all", op, model, index + 1, self._workers)
        apply = "apply " + json.dumps({"id": rid, "op": op, "model": model})
        return [(i, p, apply) for i, p in alive.items()]

    def applied(self, index: int, pid: int, line: str) -> list[tuple[int, int, str]]:
        """A worker's ``tandem-applied`` line."""
        try:
            doc = json.loads(line[len(APPLIED):])
            rid = doc["id"]
        except (ValueError, KeyError, TypeError):
            _log.error("worker %d sent a malformed applied line: %r", index + 1, line[:200])
            return []
        change = self._changes.get(rid)
        if change is None or change.waiting.get(index) != pid:
            return []  # a replayed unload, or an answer from a replaced worker
        del change.waiting[index]
        change.results.append({**doc, "worker": f"{index + 1}/{self._workers} (pid {pid})"})
        if not doc.get("ok"):
            _log.error("worker %d/%d: %s", index + 1, self._workers, doc.get("error"))
        return self._finish_if_done(rid)

    def gone(self, index: int, pid: int) -> list[tuple[int, int, str]]:
        """A worker exited: it no longer owes answers (its replacement gets the replay)."""
        out = []
        for rid, change in list(self._changes.items()):
            if change.waiting.get(index) == pid:
                del change.waiting[index]
                out += self._finish_if_done(rid)
        return out

    def replay(self) -> list[str]:
        """What a starting worker must apply before ``go``: the unloads standing."""
        return ["apply " + json.dumps({"id": f"replay-{model}", "op": "unload", "model": model}) for model in self.unloaded]

    def _finish_if_done(self, rid: str) -> list[tuple[int, int, str]]:
        change = self._changes[rid]
        if change.waiting:
            return []
        del self._changes[rid]
        index, pid = change.origin
        return [(index, pid, "result " + json.dumps({"id": rid, "results": change.results}))]
