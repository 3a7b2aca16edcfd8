"""An asyncio TCP proxy that injects network faults between a client and a server.

For tests, benchmarks and demos on machines without netem. Faults apply per direction and can be
switched at run time with :meth:`FaultProxy.set`:

- ``latency_ms`` / ``jitter_ms``: added round-trip time, half on each direction (uniform ± jitter,
  chunk order kept), so ``latency_ms=40`` turns a 1 ms round trip into about 41 ms;
- ``bandwidth_bps``: bytes per second per direction of each connection (serialisation delay);
- ``drop_rate``: share of new connections reset after their first bytes arrive;
- ``partition``: nothing passes; new connections are accepted and then black-holed, bytes in
  flight are discarded (the peer sees silence, as with a cut cable);
- ``stall``: bytes are held (not lost) until the stall is lifted.

``accepted`` counts connections ever accepted (a test can prove a call never opened one);
``client_closed`` counts connections the client closed (a test can prove a cancel really cancels).

    proxy = FaultProxy(upstream=("127.0.0.1", 8000)); await proxy.start(); proxy.set(latency_ms=40)
    python -m tandem.edge.faultproxy --upstream 127.0.0.1:8000 --listen 127.0.0.1:9000 --latency 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
from dataclasses import dataclass, fields, replace
from typing import Any

_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Faults:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_bps: float | None = None
    drop_rate: float = 0.0
    partition: bool = False
    stall: bool = False


class FaultProxy:
    def __init__(
        self, listen: tuple[str, int] = ("127.0.0.1", 0), upstream: tuple[str, int] = ("127.0.0.1", 8000), *, seed: int | None = None
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.faults = Faults()
        self.accepted = 0
        self.active = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.client_closed = 0
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._unstalled = asyncio.Event()
        self._unstalled.set()

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return self.listen[0], self.port

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.port}"

    def set(self, **faults: Any) -> Faults:
        """Change faults at run time (unnamed ones keep their value); returns the new set."""
        names = {f.name for f in fields(Faults)}
        bad = set(faults) - names
        if bad:
            raise ValueError(f"unknown fault(s) {sorted(bad)}; expected {sorted(names)}")
        f = replace(self.faults, **faults)
        if f.latency_ms < 0 or f.jitter_ms < 0 or not 0 <= f.drop_rate <= 1:
            raise ValueError("latency and jitter must be >= 0 and drop_rate in [0, 1]")
        if f.bandwidth_bps is not None and f.bandwidth_bps <= 0:
            raise ValueError("bandwidth_bps must be > 0 (or None for unlimited)")
        self.faults = f
        if f.stall:
            self._unstalled.clear()
        else:
            self._unstalled.set()
        return f

    def clear(self) -> Faults:
        """No faults at all."""
        return self.set(**{f.name: getattr(Faults(), f.name) for f in fields(Faults)})

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.drop_connections()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def drop_connections(self) -> None:
        """Reset every open connection (new ones are still accepted)."""
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # --- internals ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.active += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self.faults.partition:
                await self._blackhole(reader)
                return
            drop = self._rng.random() < self.faults.drop_rate
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # upstream down: the client sees the connection close, as with a dead server
            if drop:
                await reader.read(1)
                return
            await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            self.active -= 1
            self._conns.discard(task)
            for w in (writer, up_writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.transport.abort()

    async def _blackhole(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(_CHUNK):
            pass
        self.client_closed += 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        """Copy one direction with the current faults, keeping chunk order."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        free_at = 0.0  # when the bandwidth-capped link is next free

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, data = item
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._unstalled.wait()
                if self.faults.partition:
                    continue  # lost on the wire
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(Exception):
                writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        last_at = 0.0
        try:
            while data := await reader.read(_CHUNK):
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                f = self.faults
                if f.partition:
                    continue
                now = loop.time()
                if f.bandwidth_bps:
                    free_at = max(free_at, now) + len(data) / f.bandwidth_bps
                    base = free_at
                else:
                    base = now
                jitter = self._rng.uniform(-f.jitter_ms, f.jitter_ms) if f.jitter_ms else 0.0
                at = max(last_at, base + max(0.0, f.latency_ms + jitter) / 2000.0)
                last_at = at
                queue.put_nowait((at, data))
            if up:
                self.client_closed += 1
            queue.put_nowait(None)
            await sender
        finally:
            sender.cancel()


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _main(args: argparse.Namespace) -> None:
    proxy = FaultProxy(_hostport(args.listen), _hostport(args.upstream))
    proxy.set(
        latency_ms=args.latency,
        jitter_ms=args.jitter,
        bandwidth_bps=args.bandwidth,
        drop_rate=args.drop_rate,
        partition=args.partition,
    )
    await proxy.start()
    print(f"fault proxy {proxy.url} -> {args.upstream}: {proxy.faults}", flush=True)
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await proxy.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tandem.edge.faultproxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: a free port on 127.0.0.1)")
    p.add_argument("--latency", type=float, default=0.0, help="added round-trip latency, ms")
    p.add_argument("--jitter", type=float, default=0.0, help="± jitter, ms")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes per second per direction")
    p.add_argument("--drop-rate", type=float, default=0.0, help="share of connections reset")
    p.add_argument("--partition", action="store_true", help="start partitioned")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
