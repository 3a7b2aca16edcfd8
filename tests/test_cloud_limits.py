"""Limits on what one client can hold: a client that pipelines and never reads its answers leaves
the server's memory bounded (it stops reading that connection); thousands of idle connections
are closed by the keep-alive time, and beyond ``max_connections`` a new one gets 503 and is closed.
Both stacks, real servers on 127.0.0.1."""

from __future__ import annotations

import selectors
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_support import ServerThread, free_port, make_repository
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p
from test_cloud_cli import _serve, _wait_ready

BODY = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()
REQUEST = (f"POST /v1/models/toy/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), slow=False, varlen=False)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("front_door", [True, False], ids=["front-door", "aiohttp-only"])
def test_a_client_that_never_reads_cannot_grow_the_server(tmp_path: Path, repo: Path, keys: tuple[Path, Path], front_door: bool) -> None:
    """Pipelines ~100 MB of requests (each answered with ~450 bytes) and reads nothing: the server
    stops reading once its answers back up, so the client's sends stall, and its memory stays put."""
    port = free_port()
    env = {"TANDEM_FRONT_DOOR": str(front_door).lower(), "TANDEM_ACCESS_LOG": "false"}
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port)], env=env, stderr=tmp_path / "log")
    try:
        _wait_ready(proc)
        before = _rss_mb(proc.pid)
        burst = REQUEST * 256
        sent = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setblocking(False)
            sel = selectors.DefaultSelector()
            sel.register(sock, selectors.EVENT_WRITE)
            stalled_since = time.monotonic()
            deadline = time.monotonic() + 60
            view = memoryview(burst)
            while sent < 100 * 2**20 and time.monotonic() < deadline:
                if not sel.select(0.2):
                    if time.monotonic() - stalled_since > 3:
                        break  # the server stopped reading us
                    continue
                try:
                    n = sock.send(view[sent % len(burst):])
                except BlockingIOError:
                    continue
                sent += n
                stalled_since = time.monotonic()
            time.sleep(0.5)
            grown = _rss_mb(proc.pid) - before
            assert sent < 100 * 2**20, "the server read everything a client that reads nothing sent"
            assert grown < 60, f"server RSS grew {grown:.0f} MB for a client that sent {sent / 2**20:.0f} MB and read nothing"
        # The connection is gone: the server serves others.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(REQUEST)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("front_door", [True, False], ids=["front-door", "aiohttp-only"])
def test_idle_connections_close_at_keep_alive_and_the_cap_refuses_more(repo: Path, keys: tuple[Path, Path], front_door: bool) -> None:
    # The keep-alive must outlast opening every connection: on a loaded machine opening 1,800 took
    # over 2 s, and the first ones had idled out before the count was read.
    cap, extra, keepalive = 1500, 300, 8.0
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, front_door=front_door,
                          keepalive_timeout_s=keepalive, max_connections=cap)
    with ServerThread(config) as s:
        socks: list[socket.socket] = []
        try:
            for _ in range(cap):
                socks.append(socket.create_connection(("127.0.0.1", s.port), timeout=10))
            deadline = time.monotonic() + 30
            while s.door.connections < cap and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.door.connections == cap
            refused = []
            for _ in range(extra):
                sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
                refused.append(sock.recv(65536))
                sock.close()
            assert all(r.startswith(b"HTTP/1.1 503") and b"Connection: close" in r for r in refused)
            assert s.door.refused == extra
            t0 = time.monotonic()
            for sock in socks:
                sock.settimeout(keepalive + 10)
                assert sock.recv(1) == b""  # closed by the server, idle past the keep-alive time
            assert time.monotonic() - t0 < keepalive + 3
            deadline = time.monotonic() + 5
            while s.door.connections and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.door.connections == 0
            # An answered connection idles out too (aiohttp's own keep-alive, on that stack).
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                t0 = time.monotonic()
                assert sock.recv(1) == b""
                assert keepalive - 0.5 < time.monotonic() - t0 < keepalive + 3
        finally:
            for sock in socks:
                sock.close()
