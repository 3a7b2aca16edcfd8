"""What every request passes through, whichever HTTP stack carries it: ids, auth, errors, access log.

Two stacks serve the same port (see :mod:`.front`): a lean HTTP/1.1 front door for the infer
routes and aiohttp for everything else. Both apply this one policy, so a request is identified,
authorised, answered on error and logged the same way whichever of them took it.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from typing import Any

import msgspec

from tandem.shared import protocol as p
from tandem.shared.errors import Overloaded, TandemError, Unauthorized
from tandem.shared.tensors import packb

from .config import ServerConfig
from .inference import Inference
from .repository import ServedModel

__all__ = ["Gate", "HEADER_WORKER", "LIVENESS_PATH"]

#: Response header naming the worker pid that answered; sent only when ``workers`` > 1.
HEADER_WORKER = "X-Tandem-Worker"
#: The one route that needs no API key: a probe must see a live process without credentials.
LIVENESS_PATH = "/v2/health/live"

_access = logging.getLogger("tandem.cloud.access")


class Gate:
    """The per-request policy of one server process."""

    def __init__(self, config: ServerConfig, inference: Inference) -> None:
        self._keys = [k.encode() for k in config.api_keys]
        self._inference = inference
        self._log_access = config.access_log
        self._access_log = _AccessLog()
        # Request ids for requests that bring none: a per-process random prefix and a counter. uuid4
        # per request costs an os.urandom syscall, measurable on the hot path.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        #: (name, value) headers every response carries: with several worker processes, which one
        #: answered (clients and tests can see the spread).
        self.extra_headers: list[tuple[str, str]] = [(HEADER_WORKER, str(os.getpid()))] if config.workers > 1 else []
        #: Set when shutdown begins (``shutdown_delay_s``): every response then closes its connection,
        #: so clients with pooled connections reconnect, to another server, before this one stops.
        self.draining = False

    def request_id(self, given: str | None) -> str:
        return given or f"{self._id_prefix}-{next(self._ids)}"

    def check_auth(self, path: str, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless keys are off, the path is liveness, or a key matches."""
        if not self._keys or path == LIVENESS_PATH:
            return
        if authorization and authorization.startswith("Bearer "):
            given = authorization[7:].strip().encode()
            if any(hmac.compare_digest(given, k) for k in self._keys):
                return
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")

    def error_reply(self, error: TandemError, path: str, served: ServedModel | None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) answering ``error``: msgpack on native routes, JSON elsewhere,
        the model's queue state when known, and ``Retry-After`` on 503/429."""
        headers = self._inference.error_headers(served)
        if isinstance(error, Overloaded) or error.status in (429, 503):
            headers[p.HEADER_RETRY_AFTER] = str(retry_after_seconds(getattr(error, "retry_after", 1.0)))
        doc = error.to_dict()
        if path.startswith("/v1/models/"):  # native-protocol routes answer errors in msgpack, all others in JSON
            headers["Content-Type"] = p.CONTENT_TYPE
            try:
                body = packb(doc)
            except (TypeError, ValueError, OverflowError):  # details a client put there that msgpack cannot carry
                body = packb({"error": error.message, "code": error.code})
            return error.status, headers, body
        headers["Content-Type"] = "application/json"
        try:
            text = json.dumps(doc)
        except (TypeError, ValueError, RecursionError):
            text = json.dumps({"error": error.message, "code": error.code})
        return error.status, headers, text.encode()

    @property
    def logs_access(self) -> bool:
        return self._log_access and _access.isEnabledFor(logging.INFO)

    def log_access(
        self, rid: str, method: str, path: str, status: int, ms: float, served: ServedModel | None, remote: Any
    ) -> None:
        """Queue one JSON access-log line (callers check :attr:`logs_access` first)."""
        self._access_log.add(
            (time.time(), rid, method, path, status, ms, served.name if served else None, served.version if served else None, remote)
        )

    def close(self) -> None:
        """Write every queued access-log line (at shutdown)."""
        self._access_log.flush()


#: The longest Retry-After sent, in seconds: an estimate beyond it says nothing more useful.
MAX_RETRY_AFTER_S = 3600


def retry_after_seconds(estimate: Any) -> int:
    """Whole seconds for Retry-After: at least 1, at most MAX_RETRY_AFTER_S (NaN or garbage: 1)."""
    try:
        value = float(estimate)
    except OverflowError:  # an int beyond any float
        return MAX_RETRY_AFTER_S
    except (TypeError, ValueError):
        return 1
    if not value > 1:  # NaN too
        return 1
    return MAX_RETRY_AFTER_S if value >= MAX_RETRY_AFTER_S else math.ceil(value)


#: The fields of an access-log line, in the order :meth:`Gate.log_access` queues them.
_FIELDS = ("ts", "request_id", "method", "path", "status", "ms", "model", "version", "remote")


class _AccessLog:
    """Access-log lines leave the event loop in bulk.

    A logging call per request (record, JSON, handler, stderr write) cost ~50 µs of the loop's
    time under load, a third of the throughput on the digits CNN at 64 connections. Here a request
    costs a tuple append; a thread turns the tuples into JSON lines on the ``tandem.cloud.access``
    logger every ``_FLUSH_S``, so handlers and formats stay the app's choice. Each line carries
    ``ts``, the time the response was ready.
    """

    _FLUSH_S = 0.05

    def __init__(self) -> None:
        self._pending: deque[tuple[Any, ...]] = deque()  # append/popleft are thread-safe
        self._lock = threading.Lock()  # flush() may run from the thread and at shutdown at once
        self._thread: threading.Thread | None = None

    def add(self, entry: tuple[Any, ...]) -> None:
        self._pending.append(entry)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tandem-access-log", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._FLUSH_S)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending = self._pending
            while pending:
                ts, rid, method, path, status, ms, model, version, remote = pending.popleft()
                line = (round(ts, 3), rid, method, path, status, round(ms, 3), model, version, remote)
                _access.info(msgspec.json.encode(dict(zip(_FIELDS, line))).decode())  # a third of json.dumps's cost
