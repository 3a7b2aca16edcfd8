"""Strict HTTP/1.1 framing on both stacks: raw bytes to the front door (llhttp) and to aiohttp alone,
the same answer from each (status, and whether the connection stays open).

The cases are those request smuggling and desync attacks are made of: Content-Length beside
Transfer-Encoding, odd Transfer-Encodings, duplicate / list / signed / hex / padded lengths,
control bytes and separators in header names, control bytes in values, obs-fold, bare CR or LF,
missing and duplicate Host, absolute-form targets, HTTP/0.9 and unknown versions. A request
hidden behind a malformed one must never run.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_support import ServerThread, make_repository
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p

BODY = p.InferRequest({"input": np.ones((1, 64), np.float32)}).to_wire()
N = len(BODY)
INFER = b"POST /v1/models/toy/infer HTTP/1.1\r\n"
#: A second request hidden in a body: if it ever runs, the server framed the bytes as the attacker meant.
SMUGGLED = f"POST /v1/models/toy/infer HTTP/1.1\r\nHost: t\r\nX-Request-Id: smuggled\r\nContent-Length: {N}\r\n\r\n".encode() + BODY


def _msg(*headers: bytes, line: bytes = INFER, body: bytes = BODY) -> bytes:
    return line + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def _cl(n: int = N) -> bytes:
    return f"Content-Length: {n}".encode()


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


HOST = b"Host: t"

#: (id, raw bytes, expected status, connection stays open)
CASES: list[tuple[str, bytes, int, bool]] = [
    ("plain", _msg(HOST, _cl()), 200, True),
    ("cl-and-te", _msg(HOST, _cl(), b"Transfer-Encoding: chunked", body=_chunked(BODY)), 400, False),
    ("te-and-cl", _msg(HOST, b"Transfer-Encoding: chunked", _cl(5), body=_chunked(BODY)), 400, False),
    ("te-chunked", _msg(HOST, b"Transfer-Encoding: chunked", body=_chunked(BODY)), 200, True),
    ("te-not-last", _msg(HOST, b"Transfer-Encoding: chunked, identity", body=_chunked(BODY)), 400, False),
    ("te-unknown", _msg(HOST, b"Transfer-Encoding: xchunked", body=_chunked(BODY)), 400, False),
    ("te-space-before-colon", _msg(HOST, b"Transfer-Encoding : chunked", body=_chunked(BODY)), 400, False),
    ("te-twice", _msg(HOST, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=_chunked(BODY)), 400, False),
    ("cl-duplicate-same", _msg(HOST, _cl(), _cl()), 400, False),
    ("cl-duplicate-different", _msg(HOST, _cl(), _cl(N + 5), body=BODY + b"12345"), 400, False),
    ("cl-list", _msg(HOST, f"Content-Length: {N}, {N}".encode()), 400, False),
    ("cl-signed-plus", _msg(HOST, f"Content-Length: +{N}".encode()), 400, False),
    ("cl-signed-minus", _msg(HOST, b"Content-Length: -1"), 400, False),
    ("cl-hex", _msg(HOST, f"Content-Length: 0x{N:x}".encode()), 400, False),
    ("cl-padded", _msg(HOST, f"Content-Length:   {N}   ".encode()), 200, True),
    ("cl-leading-zeros", _msg(HOST, f"Content-Length: 000{N}".encode()), 200, True),
    ("cl-vertical-tab-in-name", _msg(HOST, b"Content-Length\x0b: 5", _cl(len(SMUGGLED) + N), body=BODY + SMUGGLED), 400, False),
    ("name-with-nul", _msg(HOST, b"X-A\x00b: 1", _cl()), 400, False),
    ("name-with-space", _msg(HOST, b"X A: 1", _cl()), 400, False),
    ("name-with-separator", _msg(HOST, b"X(A): 1", _cl()), 400, False),
    ("name-with-slash", _msg(HOST, b"X/A: 1", _cl()), 400, False),
    ("name-empty", _msg(HOST, b": 1", _cl()), 400, False),
    ("value-with-nul", _msg(HOST, b"X-A: a\x00b", _cl()), 400, False),
    ("value-with-ctl", _msg(HOST, b"X-A: a\x01b", _cl()), 400, False),
    ("value-with-del", _msg(HOST, b"X-A: a\x7fb", _cl()), 400, False),
    ("value-with-bare-cr", _msg(HOST, b"X-A: a\rb", _cl()), 400, False),
    ("obs-fold", _msg(HOST, b"X-A: a", b" b", _cl()), 400, False),
    ("bare-lf-line", INFER + HOST + b"\n" + _cl() + b"\r\n\r\n" + BODY, 400, False),
    ("bare-lf-request-line", INFER[:-2] + b"\n" + HOST + b"\r\n" + _cl() + b"\r\n\r\n" + BODY, 400, False),
    ("bare-cr-line", INFER + HOST + b"\r" + _cl() + b"\r\n\r\n" + BODY, 400, False),
    ("host-missing", _msg(_cl()), 400, False),
    ("host-twice", _msg(HOST, b"Host: u", _cl()), 400, False),
    ("absolute-form", _msg(HOST, _cl(), line=b"POST http://t/v1/models/toy/infer HTTP/1.1\r\n"), 200, True),
    ("http-0.9", b"GET /v2/health/live\r\n\r\n", 400, False),
    ("http-1.0", _msg(_cl(), line=b"POST /v1/models/toy/infer HTTP/1.0\r\n"), 200, False),
    ("http-1.0-keep-alive", _msg(_cl(), b"Connection: keep-alive", line=b"POST /v1/models/toy/infer HTTP/1.0\r\n"), 200, True),
    ("connection-close", _msg(HOST, _cl(), b"Connection: close"), 200, False),
    ("http-1.2", _msg(HOST, _cl(), line=b"POST /v1/models/toy/infer HTTP/1.2\r\n"), 400, False),
    ("http-2.0", _msg(HOST, _cl(), line=b"POST /v1/models/toy/infer HTTP/2.0\r\n"), 400, False),
    ("http-3.0", _msg(HOST, _cl(), line=b"POST /v1/models/toy/infer HTTP/3.0\r\n"), 400, False),
    ("version-lowercase", _msg(HOST, _cl(), line=b"POST /v1/models/toy/infer http/1.1\r\n"), 400, False),
    ("space-in-target", _msg(HOST, _cl(), line=b"POST /v1/models/toy /infer HTTP/1.1\r\n"), 400, False),
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), slow=False, varlen=False)


@pytest.fixture(scope="module")
def stacks(repo: Path, keys: tuple[Path, Path]) -> Iterator[dict[str, ServerThread]]:
    servers = {
        name: ServerThread(ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, front_door=fast, access_log=True))
        for name, fast in (("front-door", True), ("aiohttp", False))
    }
    for s in servers.values():
        s.start()
    try:
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def _read_response(sock: socket.socket, buf: bytes) -> tuple[int, bytes, bytes]:
    """(status, head, what follows the response) of the next response; status 0 if the server closed."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, buf, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split(b" ", 2)[1]), head, rest[length:]


def ask(s: ServerThread, raw: bytes) -> tuple[int, bool, list[bytes]]:
    """Send ``raw`` then a plain request on one connection: (first status, whether the connection
    stayed open for the plain request, request ids answered)."""
    follow = _msg(HOST, b"X-Request-Id: follow", _cl())
    ids: list[bytes] = []
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass
        status, head, rest = _read_response(sock, b"")
        ids += [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        if status == 0:
            return status, False, ids
        if b"connection: close" in head.lower():
            return status, False, ids
        try:
            sock.sendall(follow)
            second, head2, _ = _read_response(sock, rest)
        except OSError:
            return status, False, ids
        ids += [line.split(b":", 1)[1].strip() for line in head2.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        return status, second == 200, ids


@pytest.mark.parametrize("case, raw, status, stays_open", CASES, ids=[c[0] for c in CASES])
def test_both_stacks_answer_alike(
    stacks: dict[str, ServerThread], case: str, raw: bytes, status: int, stays_open: bool
) -> None:
    answers = {name: ask(s, raw) for name, s in stacks.items()}
    for name, (got, open_, ids) in answers.items():
        assert (got, open_) == (status, stays_open), (name, answers)
        assert b"smuggled" not in ids, (name, answers)


def test_a_smuggled_request_never_runs(stacks: dict[str, ServerThread]) -> None:
    """The review's attack: a length hidden in a header name with a vertical tab, a real length
    framing a second request: 400, the connection closed, the hidden request never run."""
    raw = _msg(HOST, b"Content-Length\x0b: 5", _cl(len(SMUGGLED)), body=SMUGGLED)
    for s in stacks.values():
        before = s.state.metrics.render().decode().count("smuggled")
        got, open_, ids = ask(s, raw)
        assert (got, open_) == (400, False) and b"smuggled" not in ids
        assert s.state.metrics.render().decode().count("smuggled") == before


def test_a_json_integer_beyond_python_s_limit_is_a_400_on_both_stacks(stacks: dict[str, ServerThread]) -> None:
    doc = b'{"inputs": [{"name": "input", "shape": [1, 1], "datatype": "INT64", "data": [' + b"9" * 5000 + b"]}]}"
    raw = _msg(HOST, _cl(len(doc)), b"Content-Type: application/json", line=b"POST /v2/models/toy/infer HTTP/1.1\r\n", body=doc)
    for s in stacks.values():
        got, _, _ = ask(s, raw)
        assert got == 400
