"""Graceful drain under pipelined load: SIGTERM while every connection has requests in flight and
more on the way. Every request the server took is answered; each connection's last answer says
``Connection: close``; requests a client sent after that answer are the only ones unanswered (HTTP
says they were not processed: a client retries them elsewhere). With one worker and with two."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cloud_support import free_port, make_repository
from tandem.shared import protocol as p
from test_cloud_cli import _serve, _wait_ready

CONNECTIONS = 64
DEPTH = 2  # requests each connection keeps in flight (pipelined)
BODY = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()


def _request(rid: str) -> bytes:
    return (f"POST /v1/models/toy/infer HTTP/1.1\r\nHost: t\r\nX-Request-Id: {rid}\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


@dataclass
class _Client:
    """One connection: keeps DEPTH requests in flight until an answer says Connection: close."""

    index: int
    port: int
    sent: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    closed_by_answer: bool = False
    statuses: set[int] = field(default_factory=set)
    error: str | None = None

    def run(self, stop_sending: threading.Event) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                buf = b""
                for _ in range(DEPTH):
                    self._send(sock)
                while True:
                    while b"\r\n\r\n" not in buf:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return  # closed: the checks below tell whether anything was owed
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    text = head.decode("latin-1").lower()
                    length = int(re.search(r"content-length: *(\d+)", text).group(1))  # type: ignore[union-attr]
                    while len(buf) < length:
                        chunk = sock.recv(65536)
                        if not chunk:
                            self.error = "closed mid-answer"
                            return
                        buf += chunk
                    buf = buf[length:]
                    self.statuses.add(int(text.split(" ", 2)[1]))
                    self.answered.append(re.search(r"x-request-id: *(\S+)", text).group(1))  # type: ignore[union-attr]
                    if "connection: close" in text:
                        self.closed_by_answer = True
                        return
                    if not stop_sending.is_set():
                        self._send(sock)
        except OSError as e:
            self.error = repr(e)

    def _send(self, sock: socket.socket) -> None:
        rid = f"c{self.index}-{len(self.sent)}"
        self.sent.append(rid)
        sock.sendall(_request(rid))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), slow=False, varlen=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_pipelined_load_answers_every_request_taken(
    tmp_path: Path, repo: Path, keys: tuple[Path, Path], workers: int
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(["--repository", str(repo), "--trusted-key", str(keys[1]), "--port", str(port), "--workers", str(workers)], stderr=log)
    clients = [_Client(i, port) for i in range(CONNECTIONS)]
    stop_sending = threading.Event()
    try:
        _wait_ready(proc)
        threads = [threading.Thread(target=c.run, args=(stop_sending,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(len(c.answered) for c in clients) < CONNECTIONS * 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        stop_sending.set()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    executed = {
        json.loads(line[line.index("{"):])["request_id"]
        for line in log.read_text().splitlines() if '"path":"/v1/models/toy/infer"' in line
    }
    for c in clients:
        assert c.error is None, (c.index, c.error)
        assert c.statuses == {200}, (c.index, c.statuses)
        # In order, and nothing owed was left without an answer: the connection ended on an answer
        # that said close (the requests sent after it are the ones HTTP says were not processed).
        assert c.answered == c.sent[: len(c.answered)], c.index
        assert c.closed_by_answer or len(c.answered) == len(c.sent), (c.index, len(c.sent), len(c.answered))
    answered = {rid for c in clients for rid in c.answered}
    assert executed == answered  # the server ran exactly what it answered
    assert len(answered) >= CONNECTIONS * 10
