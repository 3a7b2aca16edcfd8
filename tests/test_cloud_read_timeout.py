"""Timeouts that bound a request's total time: a head must complete within ``head_timeout_s`` of its
first byte, a body must keep ``min_body_rate`` after ``read_timeout_s`` of grace. A client that
stops, or trickles, gets 408 (or, on a connection aiohttp serves, a closed connection) within the
bound; one that keeps the rate, or that is merely idle between requests, does not. Real servers on
127.0.0.1, raw sockets."""

from __future__ import annotations

import gzip
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_support import ServerThread, make_repository
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p
from tandem.shared.errors import RequestTimeout, error_from_body
from tandem.shared.tensors import unpackb

TIMEOUT = 0.5  # read_timeout_s: a body's grace
HEAD_TIMEOUT = 1.0
RATE = 100  # min_body_rate, bytes/s


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), varlen=False)


def _config(repo: Path, keys: tuple[Path, Path], **kw: object) -> ServerConfig:
    limits = {"read_timeout_s": TIMEOUT, "head_timeout_s": HEAD_TIMEOUT, "min_body_rate": RATE}
    return ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, **{**limits, **kw})


@pytest.fixture(scope="module", params=[True, False], ids=["front-door", "aiohttp-only"])
def server(request: pytest.FixtureRequest, repo: Path, keys: tuple[Path, Path]) -> Iterator[ServerThread]:
    with ServerThread(_config(repo, keys, front_door=request.param)) as s:
        yield s


def _infer(model: str = "toy", encoding: str | None = None) -> bytes:
    body = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()
    extra = ""
    if encoding:  # the front door hands compressed bodies to aiohttp
        body, extra = gzip.compress(body), f"Content-Encoding: {encoding}\r\n"
    head = f"POST {p.infer_path(model)} HTTP/1.1\r\nHost: t\r\nContent-Type: {p.CONTENT_TYPE}\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(10 + 10 * TIMEOUT)
    return b"".join(iter(lambda: sock.recv(65536), b""))


def _response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body[: int(headers["content-length"])]


def _stall(s: ServerThread, sent: bytes) -> tuple[int, dict[str, str], bytes, float]:
    """Send part of a request, then nothing: the answer, and how long it took to come."""
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(sent)
        t0 = time.monotonic()
        raw = _read_all(sock)  # returns once the server closes
        waited = time.monotonic() - t0
    status, headers, body = _response(raw)
    return status, headers, body, waited


def _bound(sent_body: int) -> float:
    return TIMEOUT + sent_body / RATE


@pytest.mark.parametrize("cut", ["head", "body"])
def test_a_stalled_native_request_gets_408_and_its_connection_closed(server: ServerThread, cut: str) -> None:
    message = _infer()
    head_end = message.index(b"\r\n\r\n") + 4
    sent = message[: message.index(b"\r\n") + 10] if cut == "head" else message[:-7]
    bound = HEAD_TIMEOUT if cut == "head" else _bound(len(sent) - head_end)
    if cut == "head" and not server.config.front_door:
        # aiohttp has no head deadline: the connection's watcher closes it, without an answer.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(sent)
            t0 = time.monotonic()
            assert _read_all(sock) == b""
            assert bound * 0.9 <= time.monotonic() - t0 < bound + 2
        return
    status, headers, body, waited = _stall(server, sent)
    assert status == 408
    err = error_from_body(status, unpackb(body))  # native routes answer in msgpack
    assert isinstance(err, RequestTimeout)
    assert ("head was not complete" if cut == "head" else f"slower than {RATE} bytes/s") in err.message
    assert bound * 0.9 <= waited < bound + 2
    assert headers["connection"] == "close"


def _trickle(sock: socket.socket, data: bytes, gap: float, limit: float) -> float:
    """Send ``data`` a byte every ``gap`` s until the server answers or closes (or ``limit`` s
    pass); returns when that happened, from the first byte."""
    t0 = time.monotonic()
    for i in range(len(data)):
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            break  # the server closed
        if select.select([sock], [], [], gap)[0] or time.monotonic() - t0 > limit:
            break
    return time.monotonic() - t0


def test_a_trickled_head_is_cut_at_its_deadline_though_it_keeps_moving(server: ServerThread) -> None:
    """Slowloris: a byte every 0.1 s restarts no clock; the head's deadline counts from its first byte."""
    message = _infer()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        waited = _trickle(sock, message[: message.index(b"\r\n\r\n")], 0.1, HEAD_TIMEOUT + 5)
        raw = _read_all(sock)
    assert HEAD_TIMEOUT * 0.9 <= waited < HEAD_TIMEOUT + 1
    assert raw == b"" if not server.config.front_door else _response(raw)[0] == 408


def test_a_trickled_body_is_cut_when_it_falls_below_the_rate(server: ServerThread) -> None:
    message = _infer()
    head_end = message.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(message[:head_end])
        waited = _trickle(sock, message[head_end:-1], 0.05, 10)  # ~20 bytes/s, a fifth of the rate
        status = _response(_read_all(sock))[0]
    assert status == 408
    assert waited < _bound(int(waited * 20)) + 1.5


def test_a_stalled_body_aiohttp_serves_gets_408(server: ServerThread) -> None:
    """The front door hands a gzip body to aiohttp: its handler's wait for the body is bounded too."""
    status, _, body, waited = _stall(server, _infer(encoding="gzip")[:-5])
    assert status == 408 and unpackb(body)["code"] == "request_timeout"
    assert TIMEOUT * 0.9 <= waited < TIMEOUT + 5


def test_a_stalled_json_body_gets_408_in_json(server: ServerThread) -> None:
    doc = json.dumps({"records": [{"request_id": "r1", "model": "toy", "label": 3}]}).encode()
    head = f"POST /v1/feedback HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(doc)}\r\n\r\n"
    status, _, body, _ = _stall(server, head.encode() + doc[:10])
    assert status == 408 and json.loads(body)["code"] == "request_timeout"
    status, _, body, _ = _stall(server, b"POST /v2/repository/index HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n{")
    assert status == 408 and json.loads(body)["code"] == "request_timeout"


def test_a_slow_request_that_keeps_the_rate_is_served(server: ServerThread) -> None:
    """14 pieces 0.1 s apart: the head within its deadline, the body above the rate, 2.8x the
    body's grace in all."""
    message = _infer()
    step = -(-len(message) // 14)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        t0 = time.monotonic()
        for i in range(0, len(message), step):
            sock.sendall(message[i : i + step])
            time.sleep(0.1)
        assert time.monotonic() - t0 > 2.5 * TIMEOUT
        sock.shutdown(socket.SHUT_WR)
        status, _, body = _response(_read_all(sock))
    assert status == 200, body


def test_an_idle_connection_between_requests_is_kept(server: ServerThread) -> None:
    """Only a request left half-sent times out; keep-alive idleness has its own, longer limit."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(10)
        for _ in range(2):
            sock.sendall(_infer())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(3 * TIMEOUT)


def test_other_clients_are_served_while_one_stalls(repo: Path, keys: tuple[Path, Path]) -> None:
    with ServerThread(_config(repo, keys, read_timeout_s=30.0)) as s:
        stalled = socket.create_connection(("127.0.0.1", s.port))
        stalled.sendall(_infer()[:-3])
        try:
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", s.port)) as sock:
                    sock.sendall(_infer())
                    sock.shutdown(socket.SHUT_WR)
                    assert _response(_read_all(sock))[0] == 200
        finally:
            stalled.close()


def test_read_timeout_must_be_positive(repo: Path) -> None:
    with pytest.raises(ValueError, match="read_timeout_s"):
        ServerConfig(repository=repo, read_timeout_s=0)
