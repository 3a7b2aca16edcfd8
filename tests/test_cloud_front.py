"""The front door (cloud/front.py): plain infer requests answered by it, everything else handed to
aiohttp with its exact bytes, on one port, over raw sockets."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as th

from cloud_support import ServerThread, make_repository, slow_inputs
from support import run_onnx
from tandem.cloud.config import ServerConfig
from tandem.cloud.front import FrontDoor
from tandem.shared import protocol as p
from tandem.shared.errors import error_from_body
from tandem.shared.tensors import unpackb


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), varlen=False)


@pytest.fixture(scope="module")
def server(repo: Path, keys: tuple[Path, Path]) -> Iterator[ServerThread]:
    with ServerThread(ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, max_body_bytes=1 << 20)) as s:
        assert isinstance(s.door, FrontDoor)
        yield s


def _x(rows: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def _native(model: str, inputs: dict[str, np.ndarray], headers: dict[str, str] | None = None, *, version: str = "HTTP/1.1") -> bytes:
    body = p.InferRequest(inputs).to_wire()
    lines = [f"POST {p.infer_path(model)} {version}", "Host: t", f"Content-Type: {p.CONTENT_TYPE}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if not any(k.lower() == "transfer-encoding" for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Responses:
    """Reads HTTP/1.1 responses (Content-Length framed) off one socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def next(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        while len(self.buf) < n:
            self._more()
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(lines[0].split()[1]), headers, body

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk


def _connect(s: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _counts(s: ServerThread) -> tuple[int, int]:
    return s.door.served, s.door.handed_off


def _logits(body: bytes) -> np.ndarray:
    return p.InferResponse.from_wire(body).outputs["logits"]


def test_plain_native_request_is_answered_by_the_front_door(server: ServerThread, repo: Path) -> None:
    served, handed = _counts(server)
    x = _x(3)
    with _connect(server) as sock:
        sock.sendall(_native("toy", {"input": x}, {p.HEADER_REQUEST_ID: "front-1"}))
        status, headers, body = _Responses(sock).next()
    assert status == 200, body
    np.testing.assert_allclose(_logits(body), run_onnx(repo / "toy/1/cloud-fp32.onnx", x), rtol=1e-5, atol=1e-5)
    assert headers["x-request-id"] == "front-1" and headers["content-type"] == p.CONTENT_TYPE
    assert headers[p.HEADER_BATCH_SIZE.lower()] == "3" and "date" in headers
    assert headers["server"] == "tandem"
    assert _counts(server) == (served + 1, handed)


def test_one_connection_moves_to_aiohttp_at_a_message_boundary(server: ServerThread) -> None:
    """infer (front door), GET (aiohttp takes the connection), infer again (aiohttp answers)."""
    served, handed = _counts(server)
    x = _x(1, seed=1)
    with _connect(server) as sock:
        r = _Responses(sock)
        sock.sendall(_native("toy", {"input": x}))
        first = r.next()
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
        ready = r.next()
        sock.sendall(_native("toy", {"input": x}))
        third = r.next()
    assert first[0] == ready[0] == third[0] == 200
    assert first[1]["server"] == "tandem" and "aiohttp" in third[1]["server"]
    np.testing.assert_array_equal(_logits(first[2]), _logits(third[2]))
    assert _counts(server) == (served + 1, handed + 1)
    metrics = server.state.metrics.render().decode()
    assert f"tandem_front_door_requests_total {float(server.door.served)}" in metrics
    assert f"tandem_front_door_handoffs_total {float(server.door.handed_off)}" in metrics


def test_pipelined_requests_are_answered_in_order(server: ServerThread) -> None:
    """A slow request, then fast ones, in one write: their answers come back in request order,
    although the fast model finishes first; a non-plain request at the end waits for them all."""
    slow = p.InferRequest(slow_inputs(200)).to_wire()
    head = f"POST {p.infer_path('slow')} HTTP/1.1\r\nHost: t\r\nX-Request-Id: r0\r\nContent-Length: {len(slow)}\r\n\r\n"
    burst = head.encode() + slow
    for i in range(1, 4):
        burst += _native("toy", {"input": _x(1, seed=i)}, {p.HEADER_REQUEST_ID: f"r{i}"})
    burst += b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Request-Id: r4\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(burst)
        r = _Responses(sock)
        answers = [r.next() for _ in range(5)]
    assert [a[1]["x-request-id"] for a in answers] == ["r0", "r1", "r2", "r3", "r4"]
    assert all(a[0] == 200 for a in answers), [a[2][:200] for a in answers]
    np.testing.assert_allclose(p.InferResponse.from_wire(answers[0][2]).outputs["y"], slow_inputs(200)["x"] * 2)


def test_a_repeated_head_is_reused_and_a_changed_one_is_not(server: ServerThread, repo: Path) -> None:
    """The front door reuses the parse of a head identical to the connection's previous one: the
    same head twice, then heads that differ in model, request id and body length, then the first
    again, on one connection, each answered as its own head says."""
    x1, x3 = _x(1, seed=1), _x(3, seed=2)
    same = _native("toy", {"input": x1})
    requests = [
        (same, "toy", 1),
        (same, "toy", 1),
        (_native("slow", slow_inputs(1)), "slow", 1),
        (_native("toy", {"input": x3}), "toy", 3),  # another Content-Length
        (_native("toy", {"input": x1}, {p.HEADER_REQUEST_ID: "given"}), "toy", 1),
        (same, "toy", 1),
    ]
    with _connect(server) as sock:
        r = _Responses(sock)
        answers = []
        for raw, _, _ in requests:  # one at a time: each request arrives as its own read
            sock.sendall(raw)
            answers.append(r.next())
    for (_raw, model, rows), (status, _headers, body) in zip(requests, answers):
        assert status == 200, body[:200]
        out = p.InferResponse.from_wire(body)
        assert out.model_name == model
        assert next(iter(out.outputs.values())).shape[0] == rows
    assert answers[4][1]["x-request-id"] == "given"
    assert len({a[1]["x-request-id"] for a in answers}) == len(answers)
    np.testing.assert_allclose(p.InferResponse.from_wire(answers[3][2]).outputs["logits"], run_onnx(repo / "toy" / "1" / "cloud-fp32.onnx", x3), rtol=1e-5)


def test_a_request_sent_one_byte_at_a_time_is_answered(server: ServerThread) -> None:
    served = server.door.served
    data = _native("toy", {"input": _x(2, seed=5)})
    with _connect(server) as sock:
        for i in range(len(data)):
            sock.send(data[i : i + 1])
        status, _, body = _Responses(sock).next()
    assert status == 200, body
    assert server.door.served == served + 1


@pytest.mark.parametrize(
    "headers, version",
    [
        ({"Transfer-Encoding": "chunked"}, "HTTP/1.1"),
        ({"Content-Encoding": "gzip"}, "HTTP/1.1"),
        ({"Expect": "100-continue"}, "HTTP/1.1"),
        ({}, "HTTP/1.0"),
    ],
    ids=["chunked", "gzip", "expect", "http1.0"],
)
def test_requests_that_are_not_plain_go_to_aiohttp_and_are_answered(
    server: ServerThread, repo: Path, headers: dict[str, str], version: str
) -> None:
    x = _x(2, seed=7)
    body = p.InferRequest({"input": x}).to_wire()
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.compress(body)
    head = [f"POST {p.infer_path('toy')} {version}", "Host: t", f"Content-Type: {p.CONTENT_TYPE}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if "Transfer-Encoding" in headers:
        payload = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    handed = server.door.handed_off
    with _connect(server) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if "Expect" in headers:
            sock.settimeout(5)
            assert b"100 Continue" in sock.recv(1024)
        sock.sendall(payload)
        status, rheaders, rbody = _Responses(sock).next()
    assert status == 200, rbody
    assert "aiohttp" in rheaders["server"]
    np.testing.assert_allclose(_logits(rbody), run_onnx(repo / "toy/1/cloud-fp32.onnx", x), rtol=1e-5, atol=1e-5)
    assert server.door.handed_off == handed + 1


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (b"\x93\x01\x02", 400, "bad_tensor"),
        (p.InferRequest({"input": np.zeros((1, 63), np.float32)}).to_wire(), 400, "invalid_input"),
    ],
    ids=["bad-msgpack", "bad-shape"],
)
def test_front_door_errors_are_msgpack_with_status(server: ServerThread, raw: bytes, status: int, code: str) -> None:
    head = f"POST {p.infer_path('toy')} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
    with _connect(server) as sock:
        sock.sendall(head + raw)
        got, headers, body = _Responses(sock).next()
    assert got == status and headers["server"] == "tandem"
    err = error_from_body(got, unpackb(body))
    assert err.code == code and headers["x-request-id"]


def test_unknown_model_oversized_body_and_garbage_framing(server: ServerThread) -> None:
    with _connect(server) as sock:
        sock.sendall(_native("nope", {"input": _x()}))
        status, headers, body = _Responses(sock).next()
    assert status == 404 and error_from_body(status, unpackb(body)).code == "model_not_found"
    big = b"x" * ((1 << 20) + 10)
    with _connect(server) as sock:
        sock.sendall(f"POST {p.infer_path('toy')} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(big)}\r\n\r\n".encode() + big)
        status, _, body = _Responses(sock).next()  # handed to aiohttp, which enforces the limit
    assert status == 413
    assert_garbage_gets_json_400s(server)
    assert request_ok(server)


GARBAGE = (
    b"POST /v1/models/toy/infer HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /v1/models/toy/infer HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"\x00\x01\x02 garbage\r\n\r\n",
    b"GET /v2/health/ready HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
)


def assert_garbage_gets_json_400s(s: ServerThread) -> None:
    """Messages aiohttp's parser rejects: a 400 with a JSON error body, and no ERROR in the log
    (any client can send these; they are not the server's fault)."""
    for garbage in GARBAGE:
        with _connect(s) as sock:
            sock.sendall(garbage)
            status, headers, body = _Responses(sock).next()
        assert status == 400 and headers["content-type"].startswith("application/json"), (garbage[:60], body)
        assert json.loads(body)["code"] == "invalid_input" and "malformed HTTP request" in json.loads(body)["error"]


def test_garbage_is_not_logged_as_an_error(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert_garbage_gets_json_400s(server)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert any("malformed HTTP request" in r.getMessage() for r in caplog.records)


def request_ok(s: ServerThread) -> bool:
    with _connect(s) as sock:
        sock.sendall(_native("toy", {"input": _x()}))
        return _Responses(sock).next()[0] == 200


def test_half_closed_client_still_gets_its_answer(server: ServerThread) -> None:
    with _connect(server) as sock:
        sock.sendall(_native("slow", slow_inputs(20)))
        sock.shutdown(socket.SHUT_WR)
        status, _, body = _Responses(sock).next()
    assert status == 200, body


def _half_closed(s: ServerThread, message: bytes) -> tuple[int, bytes, bytes]:
    """Send one message, half-close (as ``nc -N`` does), read the answer and what follows it."""
    with _connect(s) as sock:
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        r = _Responses(sock)
        status, _, body = r.next()
        rest = r.buf + b"".join(iter(lambda: sock.recv(65536), b""))  # the server closes after answering
    return status, body, rest


def test_half_closed_client_gets_its_answer_from_aiohttp_too(server: ServerThread) -> None:
    """Requests the front door hands to aiohttp: aiohttp alone closes a half-closed connection
    before it answers (aiohttp#3659)."""
    handed = server.door.handed_off
    status, body, rest = _half_closed(server, b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200 and rest == b"", body
    body = gzip.compress(p.InferRequest(slow_inputs(20)).to_wire())  # compressed: aiohttp serves it, slowly
    head = f"POST {p.infer_path('slow')} HTTP/1.1\r\nHost: t\r\nContent-Type: {p.CONTENT_TYPE}\r\nContent-Encoding: gzip\r\n"
    status, body, rest = _half_closed(server, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert status == 200 and rest == b"", body
    assert server.door.handed_off == handed + 2


def test_a_body_cut_short_by_a_half_close_is_a_clear_400(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    head = b"POST /v1/models/toy/infer HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\nContent-Length: 1000\r\n\r\n"
    start = time.monotonic()
    status, body, rest = _half_closed(server, head + b"0123")
    assert status == 400 and b"before sending the whole body" in body and rest == b""
    assert time.monotonic() - start < 5  # not after the keep-alive time
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert request_ok(server)


def test_unmodified_tritonclient_is_served_by_the_front_door(server: ServerThread, repo: Path) -> None:
    served = server.door.served
    x = _x(2, seed=9)
    client = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for _ in range(3):
            result = client.infer("toy", [inp], outputs=[th.InferRequestedOutput("logits")])
    finally:
        client.close()
    np.testing.assert_allclose(result.as_numpy("logits"), run_onnx(repo / "toy/1/cloud-fp32.onnx", x), rtol=1e-5, atol=1e-5)
    assert server.door.served == served + 3


def test_api_keys_apply_on_the_front_door(repo: Path, keys: tuple[Path, Path]) -> None:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, api_keys=["k1"])
    with ServerThread(config) as s:
        with _connect(s) as sock:
            r = _Responses(sock)
            sock.sendall(_native("toy", {"input": _x()}))
            denied = r.next()
            sock.sendall(_native("toy", {"input": _x()}, {"Authorization": "Bearer k1"}))
            allowed = r.next()
        assert denied[0] == 401 and error_from_body(401, unpackb(denied[2])).code == "unauthorized"
        assert allowed[0] == 200 and s.door.handed_off == 0


def test_front_door_off_serves_everything_with_aiohttp(repo: Path, keys: tuple[Path, Path]) -> None:
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, front_door=False)
    with ServerThread(config) as s:
        assert not s.door.fast
        with _connect(s) as sock:
            sock.sendall(_native("toy", {"input": _x()}))
            status, headers, _ = _Responses(sock).next()
        assert status == 200 and "aiohttp" in headers["server"]
        status, body, rest = _half_closed(s, _native("slow", slow_inputs(20)))
        assert status == 200 and rest == b"", body
        assert_garbage_gets_json_400s(s)


def test_close_answers_accepted_requests_then_closes(repo: Path, keys: tuple[Path, Path]) -> None:
    s = ServerThread(ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0)).start()
    try:
        sock = _connect(s)
        sock.sendall(_native("slow", slow_inputs(200)))
        time.sleep(0.05)  # accepted and computing
        idle = _connect(s)
        time.sleep(0.1)  # accepted: asyncio drops a connection accepted as its server closes
        s.call(s.door.close(10), timeout=30)
        status, _, body = _Responses(sock).next()
        assert status == 200, body
        idle.settimeout(5)
        assert idle.recv(1) == b""  # idle connections are closed
        with pytest.raises(OSError):
            _connect(s)
        sock.close()
        idle.close()
    finally:
        s.stop()  # closes the door again (a no-op) and cleans up


async def test_the_edge_cloud_client_is_served_by_the_front_door(server: ServerThread, repo: Path) -> None:
    """HybridClient's cloud leg (aiohttp client, pooled keep-alive connections) takes the fast path."""
    from tandem.edge.cloud_client import CloudClient

    served, handed = _counts(server)
    client = CloudClient(server.url, "toy")
    try:
        x = _x(1, seed=11)
        replies = [await client.infer({"input": x}, timeout_s=10, request_id=f"edge-{i}") for i in range(5)]
    finally:
        await client.close()
    np.testing.assert_allclose(replies[-1].outputs["logits"], run_onnx(repo / "toy/1/cloud-fp32.onnx", x), rtol=1e-5, atol=1e-5)
    assert replies[-1].timing.batch_size == 1
    assert _counts(server) == (served + 5, handed)


def test_a_flood_of_pipelined_requests_is_answered_in_order(server: ServerThread, repo: Path) -> None:
    """More requests in flight on one connection than the front door reads ahead (it pauses
    reading at 128 and resumes as answers go out): all answered, in order."""
    n = 300
    burst = b"".join(_native("toy", {"input": _x(1, seed=i)}, {p.HEADER_REQUEST_ID: f"f{i}"}) for i in range(n))
    with _connect(server) as sock:
        sock.sendall(burst)
        r = _Responses(sock)
        answers = [r.next() for _ in range(n)]
    assert [a[1]["x-request-id"] for a in answers] == [f"f{i}" for i in range(n)]
    assert all(a[0] == 200 for a in answers)
    for i in (0, 7, 199, n - 1):  # each answer is its own request's
        np.testing.assert_allclose(_logits(answers[i][2]), run_onnx(repo / "toy/1/cloud-fp32.onnx", _x(1, seed=i)), rtol=1e-5, atol=1e-5)


def test_a_client_that_leaves_mid_request_costs_nothing_else(server: ServerThread) -> None:
    """The request still runs (accepted work is done); nobody is written to; the server goes on."""
    batcher = server.state.repository.get("slow").batcher
    sock = _connect(server)
    sock.sendall(_native("slow", slow_inputs(100)))
    for _ in range(400):
        if batcher.pending:
            break
        time.sleep(0.005)
    sock.close()
    for _ in range(1000):
        if not batcher.pending:
            break
        time.sleep(0.01)
    assert batcher.pending == 0
    assert server.door.internal_errors == 0
    assert request_ok(server)


def test_close_does_not_wait_for_a_half_sent_request(repo: Path, keys: tuple[Path, Path]) -> None:
    s = ServerThread(ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0)).start()
    try:
        sock = _connect(s)
        sock.sendall(_native("toy", {"input": _x()})[:-5])  # never completed: not accepted
        time.sleep(0.1)
        t0 = time.perf_counter()
        s.call(s.door.close(10), timeout=30)
        assert time.perf_counter() - t0 < 2
        sock.settimeout(5)
        assert sock.recv(1) == b""
        sock.close()
    finally:
        s.stop()


def test_the_front_door_answers_with_the_headers_and_body_aiohttp_gives(repo: Path, keys: tuple[Path, Path]) -> None:
    """The front door writes its own header lines and response bytes (fast paths): they must say
    what the aiohttp route says, cache hits and advertised cost included."""
    answers = []
    for front_door in (True, False):
        config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, front_door=front_door,
                              cost_per_call=0.25, response_cache_size=8)
        with ServerThread(config) as s, _connect(s) as sock:
            responses = _Responses(sock)
            for _ in range(2):  # a miss, then a cache hit
                sock.sendall(_native("toy", {"input": _x()}))
                status, headers, body = responses.next()
                assert status == 200
                tandem = {k: v for k, v in headers.items() if k.startswith("x-tandem-") and not k.endswith("-us")}
                msg = unpackb(body)
                assert msg.pop("id") == headers["x-request-id"]
                answers.append((tandem, headers["content-type"], msg))
    assert answers[:2] == answers[2:]
    assert answers[1][0]["x-tandem-cache"] == "hit" and answers[0][0]["x-tandem-cost"] == "0.25"


def test_the_front_door_answers_v2_binary_as_aiohttp_does(repo: Path, keys: tuple[Path, Path]) -> None:
    x = _x(2, seed=3)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    raw = (f"POST /v2/models/toy/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: {len(header)}\r\n"
           f"Content-Length: {len(header) + x.nbytes}\r\n\r\n").encode() + header + x.tobytes()
    answers = []
    for front_door in (True, False):
        config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, front_door=front_door, cost_per_call=0.25)
        with ServerThread(config) as s, _connect(s) as sock:
            responses = _Responses(sock)
            for _ in range(2):  # the JSON header parsed, then planned
                sock.sendall(raw)
                status, headers, body = responses.next()
                assert status == 200
                kept = {k: v for k, v in headers.items() if (k.startswith("x-tandem-") and not k.endswith("-us")) or k.startswith(("content-", "inference-"))}
                answers.append((kept, body))
        assert not front_door or s.door.handed_off == 0
    assert answers[0] == answers[1] == answers[2] == answers[3]
    hl = int(answers[0][0]["inference-header-content-length"])
    np.testing.assert_allclose(np.frombuffer(answers[0][1][hl:], np.float32).reshape(2, -1), run_onnx(repo / "toy/1/cloud-fp32.onnx", x), rtol=1e-5, atol=1e-5)
