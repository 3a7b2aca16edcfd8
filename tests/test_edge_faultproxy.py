"""FaultProxy against a tiny aiohttp app on 127.0.0.1: every fault, switched at run time."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from support import serve_app
from tandem.edge.faultproxy import FaultProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def upstream():  # type: ignore[no-untyped-def]
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application(client_max_size=4 << 20)
    app.router.add_post("/echo", echo)
    async with serve_app(app) as port:
        yield port


@pytest.fixture
async def proxy(upstream: int):  # type: ignore[no-untyped-def]
    async with FaultProxy(upstream=("127.0.0.1", upstream), seed=0) as p:
        yield p


async def timed_post(url: str, body: bytes, timeout: float = 5.0) -> tuple[float, bytes]:
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        async with s.post(url + "/echo", data=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            data = await r.read()
        return (time.perf_counter() - t0) * 1000, data


async def test_passes_bytes_through_and_counts_connections(proxy: FaultProxy) -> None:
    body = bytes(range(256)) * 1000
    ms, data = await timed_post(proxy.url, body)
    assert data == body and proxy.accepted == 1
    assert proxy.bytes_up > len(body) and proxy.bytes_down > len(body)


async def test_latency_and_jitter_are_added(proxy: FaultProxy) -> None:
    base, _ = await timed_post(proxy.url, b"x")
    proxy.set(latency_ms=80, jitter_ms=10)
    slow = [ (await timed_post(proxy.url, b"x"))[0] for _ in range(3)]
    assert all(s >= 70 for s in slow), slow
    proxy.set(latency_ms=0, jitter_ms=0)
    fast, _ = await timed_post(proxy.url, b"x")
    assert fast < 60


async def test_bandwidth_cap_slows_large_transfers(proxy: FaultProxy) -> None:
    proxy.set(bandwidth_bps=1_000_000)
    ms, data = await timed_post(proxy.url, b"a" * 300_000)
    assert len(data) == 300_000 and ms >= 500  # 300 kB each way at 1 MB/s


async def test_partition_blackholes_and_heals(proxy: FaultProxy) -> None:
    proxy.set(partition=True)
    with pytest.raises(asyncio.TimeoutError):
        await timed_post(proxy.url, b"x", timeout=0.3)
    proxy.set(partition=False)
    _, data = await timed_post(proxy.url, b"ok")
    assert data == b"ok"


async def test_stall_holds_bytes_until_lifted(proxy: FaultProxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/echo", data=b"warm") as r:
            await r.read()
        proxy.set(stall=True)
        asyncio.get_running_loop().call_later(0.4, lambda: proxy.set(stall=False))
        t0 = time.perf_counter()
        async with s.post(proxy.url + "/echo", data=b"held") as r:
            assert await r.read() == b"held"
        assert time.perf_counter() - t0 >= 0.35


async def test_drop_rate_resets_connections(proxy: FaultProxy) -> None:
    proxy.set(drop_rate=1.0)
    with pytest.raises(aiohttp.ClientError):
        await timed_post(proxy.url, b"x")
    proxy.clear()
    assert (await timed_post(proxy.url, b"y"))[1] == b"y"


async def test_upstream_down_closes_the_connection() -> None:
    from edge_support import free_port

    async with FaultProxy(upstream=("127.0.0.1", free_port())) as p:
        with pytest.raises(aiohttp.ClientError):
            await timed_post(p.url, b"x")


def test_bad_settings_are_refused() -> None:
    p = FaultProxy()
    with pytest.raises(ValueError, match="unknown fault"):
        p.set(lag=3)
    with pytest.raises(ValueError):
        p.set(drop_rate=2)
    with pytest.raises(ValueError):
        p.set(bandwidth_bps=0)
