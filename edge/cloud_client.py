"""The edge's client for the cloud tier: native msgpack protocol over one pooled aiohttp session.

Every call carries its remaining deadline (``X-Tandem-Deadline-Ms`` and the body's ``deadline_ms``)
so the server can drop work nobody waits for, and is bounded locally by the same deadline: when it
passes, or when the caller cancels (a hedge lost), the HTTP request is cancelled and its connection
closed, not left to finish. The server's timing headers come back parsed for the router; errors come
back as the :mod:`tandem.shared.errors` type the server sent, with ``Retry-After`` kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import numpy as np

from tandem.shared.errors import DeadlineExceeded, Overloaded, TandemError, Unavailable
from tandem.shared.protocol import (
    CONTENT_TYPE,
    HEADER_DEADLINE_MS,
    HEADER_MODEL_VERSION,
    HEADER_REQUEST_ID,
    HEADER_RETRY_AFTER,
    InferRequest,
    InferResponse,
    ServerTiming,
    error_from_reply,
    infer_path,
)


@dataclass(slots=True)
class CloudReply:
    outputs: dict[str, np.ndarray]
    timing: ServerTiming
    rtt_ms: float
    model_version: str | None
    request_id: str | None = None


class CloudClient:
    """One connection pool to one cloud endpoint, bound to the event loop it is first used on."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: str | None = None,
        api_key: str | None = None,
        pool_size: int = 32,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"cloud_url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/") + infer_path(model, version)
        self._headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, enable_cleanup_closed=True),
                # Bounded per call by the caller's deadline instead.
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def infer(
        self, inputs: Mapping[str, np.ndarray], timeout_s: float, *, request_id: str | None = None
    ) -> CloudReply:
        """One call, ending within ``timeout_s``; raises a TandemError on any failure."""
        if timeout_s <= 0:
            raise DeadlineExceeded("no time left for a cloud call")
        deadline_ms = timeout_s * 1000.0
        body = InferRequest(dict(inputs), id=request_id, deadline_ms=deadline_ms).to_wire()
        headers = dict(self._headers)
        headers[HEADER_DEADLINE_MS] = f"{deadline_ms:.0f}"
        if request_id:
            headers[HEADER_REQUEST_ID] = request_id
        session = self._get_session()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                async with session.post(self.url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    status, rh = resp.status, resp.headers
        except TimeoutError:
            raise DeadlineExceeded(f"cloud did not answer within {deadline_ms:.0f} ms") from None
        except (aiohttp.ClientError, OSError) as e:
            raise Unavailable(f"cloud unreachable: {type(e).__name__}: {e}") from None
        rtt_ms = (time.perf_counter() - t0) * 1000.0
        if status != 200:
            raise _error(status, payload, rh.get(HEADER_RETRY_AFTER))
        try:
            resp_msg = InferResponse.from_wire(payload)
        except TandemError as e:
            raise Unavailable(f"cloud sent an unreadable response: {e.message}") from None
        return CloudReply(
            outputs=resp_msg.outputs,
            timing=ServerTiming.from_headers(rh),
            rtt_ms=rtt_ms,
            model_version=rh.get(HEADER_MODEL_VERSION) or resp_msg.model_version or None,
            request_id=request_id,
        )

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def _error(status: int, payload: bytes, retry_after: str | None) -> TandemError:
    err = error_from_reply(status, payload)
    if status in (429, 503) and not isinstance(err, (Overloaded, Unavailable)):
        err = Overloaded(err.message)
    # Only the server's own hint counts; None means "no hint".
    err.retry_after = _parse_retry_after(retry_after)  # type: ignore[attr-defined]
    return err


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: not worth a date parser for a hint
