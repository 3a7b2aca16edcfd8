"""The inference path both protocols share: resolve the version, check inputs, cache, batch, time.

Each wire protocol (:mod:`.wire`) decodes its format into ``{name: ndarray}``, calls
:meth:`Inference.start` (then the front door finishes on the call's future, aiohttp's route awaits
:meth:`Inference.wait`) and encodes the :class:`Outcome`; everything else (validation against the
model, priorities, deadlines, the response cache, metrics, the X-Tandem-* timing headers) lives
here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from aiohttp import web

from tandem.shared import protocol as p
from tandem.shared import v2
from tandem.shared.errors import InvalidInput, TandemError

from .batcher import BatchResult
from .cache import ResponseCache
from .config import ServerConfig
from .repository import ModelRepository, ServedModel

__all__ = ["Call", "Outcome", "Inference", "MODEL_KEY", "REQUEST_ID_KEY"]

# Per-request storage: the model version a request resolved to (for error headers and the access
# log) and its request id. RequestKey exists from aiohttp 3.12; plain strings work before that.
if hasattr(web, "RequestKey"):
    MODEL_KEY: Any = web.RequestKey("tandem_model", object)
    REQUEST_ID_KEY: Any = web.RequestKey("tandem_request_id", str)
else:  # pragma: no cover - older aiohttp
    MODEL_KEY, REQUEST_ID_KEY = "tandem_model", "tandem_request_id"


@dataclass(slots=True)
class Outcome:
    model: ServedModel
    outputs: dict[str, np.ndarray]
    queue_us: float
    compute_us: float
    batch_size: int
    cached: bool = False


@dataclass(slots=True)
class Call:
    """One started request: queued on a batcher (``future``) or already answered (``outcome``)."""

    served: ServedModel
    future: asyncio.Future[BatchResult] | None
    outputs: Sequence[str] | None
    key: Any
    outcome: Outcome | None


class Inference:
    def __init__(self, repository: ModelRepository, config: ServerConfig) -> None:
        self.repository = repository
        self._cost = repr(config.cost_per_call) if config.cost_per_call is not None else None
        self._cache = ResponseCache(config.response_cache_size) if config.response_cache_size else None
        # Both protocols' request decoders, as the job runner calls them.
        self.decoder = SimpleNamespace(decode=p.InferRequest.from_wire)
        self.v2_decoder = SimpleNamespace(decode=v2.parse_infer_request)

    @property
    def caches_responses(self) -> bool:
        return self._cache is not None

    def resolve(self, name: str, version: str | None) -> ServedModel:
        return self.repository.get(name, version)

    def start(
        self,
        served: ServedModel,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> Call:
        """Check one request and queue it on the model's batcher (or answer it from the cache).

        ``served`` is what :meth:`resolve` gave the caller just before, with no await in between
        (so a reload that swaps versions can never hand a request to a batcher already draining,
        and a canary split picks once per request: the request's errors count where it runs). The
        fast front door (:mod:`.front`) needs no task per request either: it waits on the future.
        Counts a failure and raises the :class:`TandemError` when the request is refused.
        """
        try:
            rows = served.engine.check_inputs(inputs)
            if outputs is not None:
                unknown = [o for o in outputs if o not in served.engine.output_names]
                if unknown:
                    raise InvalidInput(
                        f"unknown output(s) {', '.join(map(repr, unknown))}; the model has {', '.join(served.engine.output_names)}"
                    )
            key = None
            if self._cache is not None:
                key = self._cache.key(served.name, served.version, inputs, outputs)
                hit = self._cache.get(key)
                if hit is not None:
                    served.metrics.cache_hit()
                    return Call(served, None, outputs, None, Outcome(served, hit, 0.0, 0.0, 0, cached=True))
            future = served.batcher.submit(inputs, rows, priority=priority, timeout_s=timeout_s)
        except TandemError as e:
            served.metrics.failure(e.code)
            raise
        return Call(served, future, outputs, key, None)

    def finish(self, call: Call) -> Outcome:
        """The outcome of a started call whose future is done; raises (and counts) its error."""
        if call.outcome is not None:
            return call.outcome
        served = call.served
        assert call.future is not None
        try:
            result = call.future.result()
        except TandemError as e:
            served.metrics.failure(e.code)
            raise
        out = result.outputs
        if call.outputs is not None:
            out = {name: out[name] for name in call.outputs}
        if call.key is not None and self._cache is not None:
            self._cache.put(call.key, out)
        return Outcome(served, out, result.queue_us, result.compute_us, result.batch_size)

    async def wait(self, call: Call) -> Outcome:
        """Wait for a started call and :meth:`finish` it. Cancelling the waiter cancels the
        future, and the batcher then skips the request."""
        if call.future is not None:
            try:
                await call.future
            except TandemError:
                pass  # finish() counts and raises it
        return self.finish(call)

    def header_text(self, outcome: Outcome) -> str:
        """The X-Tandem-* server-timing headers as HTTP header lines, each ending in CRLF: what the
        front door writes (one f-string costs ~0.7 us less than building a dict and joining it)."""
        served = outcome.model
        text = (
            f"{p.HEADER_QUEUE_US}: {outcome.queue_us:.0f}\r\n{p.HEADER_COMPUTE_US}: {outcome.compute_us:.0f}\r\n"
            f"{p.HEADER_BATCH_SIZE}: {outcome.batch_size}\r\n{p.HEADER_QUEUE_DEPTH}: {served.batcher.depth}\r\n"
            f"{p.HEADER_MODEL_VERSION}: {served.version}\r\n"
        )
        if outcome.cached:
            text += "X-Tandem-Cache: hit\r\n"
        if self._cost is not None:
            text += f"{p.HEADER_COST}: {self._cost}\r\n"
        return text

    def error_headers(self, served: ServedModel | None) -> dict[str, str]:
        """What is known about the model's state when a request failed."""
        if served is None:
            return {}
        return {p.HEADER_QUEUE_DEPTH: str(served.batcher.depth), p.HEADER_MODEL_VERSION: served.version}


def header_dict(text: str) -> dict[str, str]:
    """HTTP header lines (``Name: value``, CRLF-separated) as a dict."""
    return dict(line.split(": ", 1) for line in text.splitlines())


def header_lines(headers: Mapping[str, str]) -> str:
    """A dict of headers as HTTP header lines, each ending in CRLF (:func:`header_dict` reversed)."""
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items())


def deadline_seconds(header_ms: str | None, body_ms: float | None) -> float | None:
    """The tighter of the X-Tandem-Deadline-Ms header and the body's deadline_ms, in seconds."""
    values = []
    if header_ms is not None:
        try:
            values.append(float(header_ms))
        except ValueError:
            raise InvalidInput(f"{p.HEADER_DEADLINE_MS} must be a number of milliseconds, got {header_ms!r}") from None
    if body_ms is not None:
        values.append(float(body_ms))
    if not values:
        return None
    ms = min(values)
    if ms != ms:  # NaN
        raise InvalidInput("deadline must be a number of milliseconds")
    return ms / 1000
