"""The agent process: recovers the store, serves the local API, runs the update, upload and
telemetry loops, and stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tandem.shared import signing
from tandem.shared.errors import InvalidInput, TandemError

from .config import AgentConfig, is_loopback
from .local_api import create_app, to_plain
from .lock import DataDirLock
from .monitor import AgentMonitor
from .outbox import Outbox
from .routing import Router, RouterSlot
from .store import Activation, ModelStore, write_json_atomic
from .sync import Updater, Uploader

log = logging.getLogger(__name__)

RUNTIME_NAME = "agent.json"
OUTBOX_NAME = "outbox.sqlite"
class AddressInUse(TandemError):
    status = 409
    code = "address_in_use"


class Agent:
    """Build with a config, ``await start()``, ``await stop()``; :func:`run_agent` does both."""

    def __init__(self, config: AgentConfig) -> None:
        if not config.trusted_keys:
            raise InvalidInput("the agent needs at least one trusted_keys entry to verify what it installs")
        self.config = config
        self.tracked = [m.name for m in config.models]
        self.keys = [signing.load_public_key(k) for k in config.trusted_keys]
        # Before anything in the data directory is opened: a second agent must touch nothing.
        self._lock = DataDirLock(config.data_dir)
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        self.routers: dict[str, RouterSlot] = {}
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.updater: Updater | None = None
        self.uploader: Uploader | None = None
        self._stopped = False

    def _open(self) -> None:
        config = self.config
        self.store = ModelStore(config.data_dir, self.keys, config.keep_versions, config.intra_op_threads)
        self.outbox = Outbox(config.data_dir / OUTBOX_NAME, config.outbox_max_rows, config.outbox_max_age_s)
        # Drift and live quality of what this device serves (monitor.json, "profile" records).
        self.monitor = AgentMonitor(config.data_dir, self.enqueue, config.monitoring)

    async def start(self, run_loops: bool = True) -> None:
        """Recover, serve, and (``run_loops``) start polling/uploading; without loops the caller
        drives ``updater.poll_once()`` / ``uploader.flush()`` itself (tests, one-shot tools)."""
        cfg = self.config
        active = await asyncio.to_thread(self.store.recover)
        for name in self.tracked:
            if active.get(name):
                await self._load_router(name, active[name])  # type: ignore[arg-type]
        await self._serve()
        if cfg.cloud_url:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=10))
            self.updater = Updater(cfg, self.store, self._session, self._on_activate, self._on_refuse)
            self.uploader = Uploader(cfg, self.outbox, self._session)
            if run_loops:
                self._tasks += [asyncio.create_task(self.updater.run(self._stop), name="agent-update"),
                                asyncio.create_task(self.uploader.run(self._stop), name="agent-upload")]
        if run_loops:
            self._tasks.append(asyncio.create_task(self._telemetry(), name="agent-telemetry"))
            self._tasks.append(asyncio.create_task(self.monitor.run(self._stop), name="agent-monitor"))
        write_json_atomic(cfg.data_dir / RUNTIME_NAME, {
            "pid": os.getpid(), "url": self.url,
            "socket": str(cfg.socket_path) if cfg.unix_socket else None, "started_at": time.time(),
        })
        log.info("agent serving on %s%s", self.url, f" and {cfg.socket_path}" if cfg.unix_socket else "")

    async def _serve(self) -> None:
        cfg = self.config
        self._runner = web.AppRunner(create_app(self), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port)
        try:
            await site.start()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise AddressInUse(
                f"the local API cannot listen on {cfg.host}:{cfg.port}: another process is using that address; "
                "set port (config file, TANDEM_AGENT_PORT or --port) to a free port, or 0 for any free one"
            ) from None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{cfg.host}:{port}"
        if not is_loopback(cfg.host) and not cfg.local_token:
            log.warning("the local API listens on %s without a local_token: anyone who can reach it can call it",
                        cfg.host)
        if cfg.unix_socket:
            await web.SockSite(self._runner, _bind_unix_socket(cfg.socket_path)).start()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.monitor.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for slot in self.routers.values():
            await slot.aclose()
        if self._session is not None:
            await self._session.close()
        self.outbox.close()
        # Safe to remove: the lock proves these are this agent's, not another one's.
        (self.config.data_dir / RUNTIME_NAME).unlink(missing_ok=True)
        if self.config.unix_socket:
            self.config.socket_path.unlink(missing_ok=True)
        self._lock.release()

    async def _load_router(self, name: str, version: str) -> None:
        bundle = await asyncio.to_thread(self.store.load, name, version)
        router = self.monitor.wrap(await asyncio.to_thread(Router, bundle, self.config), bundle)
        slot = self.routers.get(name)
        if slot is None:
            self.routers[name] = RouterSlot(router)
        else:
            await slot.swap(router)

    async def _on_activate(self, activation: Activation) -> None:
        if activation.name not in self.tracked:
            return
        try:
            await self._load_router(activation.name, activation.version)
        except Exception as e:  # the new version verified but will not serve: go back, keep serving
            if isinstance(e, TandemError):  # says what is wrong (e.g. no confidence for the cascade)
                log.error("serving %s:%s failed, rolling back: %s", activation.name, activation.version, e)
            else:
                log.exception("serving %s:%s failed; rolling back", activation.name, activation.version)
            back = self.store.rollback(activation.name, f"router failed to start: {e}")
            self.store.record_attempt(activation.name, activation.version, "rolled-back", str(e), "router_failed")
            if back is not None and (slot := self.routers.get(activation.name)) and slot.router.version != back.version:
                await self._load_router(activation.name, back.version)
        else:
            await self.enqueue([{"kind": "telemetry", "model": activation.name, "version": activation.version,
                                 "payload": {"event": "activated", "previous": activation.previous}}])

    async def _on_refuse(self, name: str, version: str | None, code: str, message: str) -> None:
        await self.enqueue([{"kind": "telemetry", "model": name, "version": version,
                             "payload": {"event": "update_refused", "code": code, "message": message,
                                         "active": self.store.active_version(name)}}])

    async def enqueue(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        records = list(records)
        self.monitor.on_records(records)
        return await asyncio.to_thread(self.outbox.append, records)

    async def record_route(self, model: str, version: str, request_id: str | None, route: Mapping[str, Any]) -> None:
        if not self.config.record_routes:
            return
        rec: dict[str, Any] = {"kind": "route", "model": model, "version": version, "payload": to_plain(dict(route))}
        if request_id:
            rec["request_id"] = request_id
        try:
            await self.enqueue([rec])
        except TandemError:
            log.exception("route record refused")

    async def _telemetry(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.telemetry_interval_s)
                return
            except TimeoutError:
                pass
            stats = await asyncio.to_thread(self.outbox.stats)
            records = []
            for name in self.tracked:
                records.append({"kind": "telemetry", "model": name, "version": self.store.active_version(name),
                                "payload": {"event": "heartbeat", "outbox": stats,
                                            "last_attempt": self.store.state(name).get("last_attempt")}})
            await self.enqueue(records)


def _bind_unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that is owner/group-only (0660) from the moment it exists.

    The umask is set around bind() itself: a chmod after bind would leave a window in which any local
    user could connect.
    """
    if len(os.fsencode(path)) > 100:  # sun_path holds 104-108 bytes depending on the OS
        raise InvalidInput(f"{path} is too long for a Unix socket path; use a shorter data_dir or set unix_socket: false")
    # A stale socket from a killed agent would make the bind fail; the data directory lock says it is not in use.
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT."""
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except BaseException:
        await agent.stop()
        raise
    print(json.dumps({"event": "ready", "url": agent.url,
                      "socket": str(config.socket_path) if config.unix_socket else None}), flush=True)
    try:
        await stop.wait()
    finally:
        await agent.stop()
