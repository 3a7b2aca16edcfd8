"""CloudClient against a small aiohttp app on 127.0.0.1: what it sends, what it parses, how it fails."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from support import serve_app
from tandem.edge.cloud_client import CloudClient
from tandem.shared.errors import DeadlineExceeded, InvalidInput, Overloaded, TandemError, Unavailable
from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, ServerTiming, error_body

pytestmark = pytest.mark.timeout(60)
X = np.arange(64, dtype=np.float32).reshape(1, 64)


@pytest.fixture
async def server():  # type: ignore[no-untyped-def]
    seen: list[tuple[Any, InferRequest]] = []
    mode = {"kind": "ok"}

    async def infer(request: web.Request) -> web.Response:
        req = InferRequest.from_wire(await request.read())
        seen.append((request.headers.copy(), req))
        kind = mode["kind"]
        if kind == "ok":
            body = InferResponse({"logits": req.inputs["input"][:, :10] * 2}, "toy", "7", req.id).to_wire()
            timing = ServerTiming(queue_us=1500, compute_us=300, batch_size=4, queue_depth=9, cost=0.002)
            return web.Response(body=body, content_type=CONTENT_TYPE, headers=timing.to_headers() | {"X-Tandem-Model-Version": "7"})
        if kind == "busy":
            return web.Response(status=503, body=error_body("queue full", "overloaded"), content_type=CONTENT_TYPE,
                                headers={"Retry-After": "2"})
        if kind == "bad":
            return web.Response(status=400, body=error_body("input 'input' has shape [1, 64]", "invalid_input"),
                                content_type=CONTENT_TYPE)
        if kind == "html":
            return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
        if kind == "garbage":
            return web.Response(status=200, body=b"\xc1\xc1", content_type=CONTENT_TYPE)
        await asyncio.sleep(1.0)  # "slow"
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/models/{m}/infer", infer)
    app.router.add_post("/v1/models/{m}/versions/{v}/infer", infer)
    async with serve_app(app) as port:
        yield f"http://127.0.0.1:{port}", seen, mode


async def test_sends_deadline_id_and_key_and_parses_timing(server) -> None:  # type: ignore[no-untyped-def]
    url, seen, _ = server
    c = CloudClient(url, "toy", api_key="s3cret")
    try:
        reply = await c.infer({"input": X}, 0.5, request_id="abc")
    finally:
        await c.close()
    headers, req = seen[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["X-Request-Id"] == "abc" and req.id == "abc"
    assert 400 <= float(headers["X-Tandem-Deadline-Ms"]) <= 500
    assert req.deadline_ms is not None and 400 <= req.deadline_ms <= 500
    np.testing.assert_array_equal(reply.outputs["logits"], X[:, :10] * 2)
    assert reply.timing == ServerTiming(queue_us=1500, compute_us=300, batch_size=4, queue_depth=9, cost=0.002)
    assert reply.model_version == "7" and reply.rtt_ms > 0


async def test_pinned_version_uses_the_versioned_path(server) -> None:  # type: ignore[no-untyped-def]
    url, seen, _ = server
    c = CloudClient(url, "toy", version="3")
    assert c.url.endswith("/v1/models/toy/versions/3/infer")
    try:
        await c.infer({"input": X}, 0.5)
    finally:
        await c.close()
    assert len(seen) == 1


@pytest.mark.parametrize(
    "kind, error, match",
    [
        ("busy", Overloaded, "queue full"),
        ("bad", InvalidInput, "shape"),
        ("html", TandemError, "HTTP 502"),
        ("garbage", Unavailable, "unreadable"),
    ],
)
async def test_errors_come_back_typed(server, kind: str, error: type, match: str) -> None:  # type: ignore[no-untyped-def]
    url, _, mode = server
    mode["kind"] = kind
    c = CloudClient(url, "toy")
    try:
        with pytest.raises(error, match=match) as info:
            await c.infer({"input": X}, 1.0)
    finally:
        await c.close()
    if kind == "busy":
        assert info.value.retry_after == 2.0


async def test_deadline_and_unreachable(server) -> None:  # type: ignore[no-untyped-def]
    from edge_support import free_port

    url, _, mode = server
    mode["kind"] = "slow"
    c = CloudClient(url, "toy")
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeadlineExceeded):
            await c.infer({"input": X}, 0.2)
        assert loop.time() - t0 < 1.0
        with pytest.raises(DeadlineExceeded):
            await c.infer({"input": X}, 0.0)
    finally:
        await c.close()
    dead = CloudClient(f"http://127.0.0.1:{free_port()}", "toy")
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            await dead.infer({"input": X}, 1.0)
    finally:
        await dead.close()
    with pytest.raises(ValueError):
        CloudClient("ftp://x", "toy")
