"""Garbage at both protocols (hypothesis, bounded): always a 4xx with an error body, never a crash.

After the storm the same server still answers good requests on both protocols.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_support import ServerThread, make_repository, request
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p
from tandem.shared.tensors import packb, unpackb

MAX_BODY = 256 * 1024
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[ServerThread]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), slow=False)
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, max_body_bytes=MAX_BODY, warmup_batch_sizes=[1], access_log=False)
    with ServerThread(config) as s:
        yield s


def _good_native() -> bytes:
    return p.InferRequest({"input": np.ones((2, 64), np.float32)}).to_wire()


def _good_v2() -> tuple[bytes, int]:
    x = np.ones((2, 64), np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return header + x.tobytes(), len(header)


def _check_error(status: int, body: bytes, native: bool) -> None:
    assert status < 500, (status, body[:200])
    if status != 200:
        doc = unpackb(body) if native else json.loads(body)
        assert isinstance(doc["error"], str) and doc["error"]


msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8), st.binary(max_size=64)),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=20,
)
tensor_like = st.fixed_dictionaries(
    {"datatype": st.sampled_from(["FP32", "FP64", "INT8", "BYTES", "BOOL", "nope"]),
     "shape": st.lists(st.integers(-2, 70), max_size=3), "data": st.one_of(st.binary(max_size=600), msgpack_values)}
)


@FUZZ
@given(st.one_of(
    st.binary(max_size=400),
    msgpack_values.map(packb),
    st.dictionaries(st.sampled_from(["inputs", "outputs", "id", "deadline_ms", "priority", "parameters", "x"]),
                    st.one_of(msgpack_values, st.dictionaries(st.sampled_from(["input", "x"]), tensor_like, max_size=2)),
                    max_size=4).map(packb),
    st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=4)).map(
        lambda t: _good_native()[: t[0]] + t[1] + _good_native()[t[0] + len(t[1]):]),
))
def test_native_garbage(server: ServerThread, body: bytes) -> None:
    status, headers, raw = request(server.url, "POST", p.infer_path("toy"), body, {"Content-Type": p.CONTENT_TYPE})
    _check_error(status, raw, native=True)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400),
        st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
                     lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.sampled_from(["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "binary_data_size", "id"]), c, max_size=5)),
                     max_leaves=25).map(lambda d: json.dumps(d).encode()),
        st.tuples(st.integers(0, 600), st.binary(min_size=1, max_size=4)).map(
            lambda t: _good_v2()[0][: t[0]] + t[1] + _good_v2()[0][t[0] + len(t[1]):]),
    ),
    st.one_of(st.none(), st.integers(-3, 700).map(str), st.text(max_size=4)),
    st.sampled_from([None, "gzip", "deflate"]),
)
def test_v2_garbage(server: ServerThread, body: bytes, header_length: str | None, encoding: str | None) -> None:
    headers = {}
    if header_length is not None and header_length.isprintable() and header_length.strip() == header_length and header_length.isascii():
        headers["Inference-Header-Content-Length"] = header_length
    if encoding is not None:
        headers["Content-Encoding"] = encoding  # body is not really compressed: must be a 4xx
    status, _, raw = request(server.url, "POST", "/v2/models/toy/infer", body, headers, timeout=10)
    _check_error(status, raw, native=False)


def test_oversized_bodies_are_refused(server: ServerThread) -> None:
    big = np.ones((MAX_BODY // 256 + 8, 64), np.float32)
    status, _, raw = request(server.url, "POST", p.infer_path("toy"), p.InferRequest({"input": big}).to_wire())
    assert status == 413 and unpackb(raw)["code"] == "payload_too_large"
    bomb = gzip.compress(b"\0" * (4 * MAX_BODY))  # small on the wire, large once inflated
    assert len(bomb) < MAX_BODY
    status, _, raw = request(server.url, "POST", "/v2/models/toy/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "too large" in json.loads(raw)["error"]


def test_lying_content_length_and_broken_connections(server: ServerThread) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    for payload in (
        b"POST /v1/models/toy/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n\x81\xa6inputs",  # then hang up
        b"POST /v2/models/toy/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"POST /v2/models/toy/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            try:
                reply = sock.recv(4096)
            except OSError:
                reply = b""
            assert not reply or not reply.startswith(b"HTTP/1.1 5"), reply[:100]


def test_server_still_answers_after_the_storm(server: ServerThread) -> None:
    status, _, raw = request(server.url, "POST", p.infer_path("toy"), _good_native())
    assert status == 200 and p.InferResponse.from_wire(raw).outputs["logits"].shape == (2, 10)
    body, hl = _good_v2()
    status, headers, raw = request(server.url, "POST", "/v2/models/toy/infer", body, {"Inference-Header-Content-Length": str(hl)})
    assert status == 200 and json.loads(raw)["outputs"][0]["shape"] == [2, 10]
    assert server.state.repository.pending() == 0
    text = request(server.url, "GET", "/metrics")[2].decode()
    assert 'tandem_inference_pending_request_count{model="toy",version="1"} 0.0' in text
    assert msgpack is not None


# --- HTTP framing at the front door (cloud/front.py parses request heads itself) --------------

_header_lines = st.one_of(
    st.sampled_from([
        b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999",
        b"Content-Length: 1e3", b"Content-Length:  7 ", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
        b"Content-Encoding: gzip", b"Content-Encoding: identity", b"Connection: close", b"Connection: keep-alive",
        b"Expect: 100-continue", b"Upgrade: h2c", b"X-Tandem-Deadline-Ms: nan", b"X-Tandem-Priority: x",
        b"Inference-Header-Content-Length: 3", b" folded", b"\tfolded", b"NoColon", b": empty-name", b"Bad Name: 1",
        b"X-Request-Id: \xff\xfe", b"Authorization: Bearer x",
    ]),
    st.binary(max_size=40).filter(lambda b: b"\r\n" not in b),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    method=st.sampled_from([b"POST", b"GET", b"post", b"PUT", b""]),
    target=st.sampled_from([b"/v1/models/toy/infer", b"/v2/models/toy/infer", b"/v1/models/toy/versions/1/infer",
                            b"/v1/models/t%6fy/infer", b"/v1/models/toy/infer?x=1", b"/v1/models//infer", b"*", b""]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 extra", b""]),
    headers=st.lists(_header_lines, max_size=6),
    body=st.binary(max_size=64),
    split=st.integers(0, 200),
)
def test_front_door_framing_garbage_never_hangs_or_breaks_the_server(
    server: ServerThread, method: bytes, target: bytes, version: bytes, headers: list[bytes], body: bytes, split: int
) -> None:
    """Any request head: an HTTP answer (never a 5xx) or a closed connection, within the timeout."""
    raw = b" ".join(x for x in (method, target, version) if x) + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    data = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(raw[:split])
            sock.sendall(raw[split:])
            sock.shutdown(socket.SHUT_WR)  # no more bytes: a server waiting for a body must give up, not hang
        except OSError:
            pass  # the server already answered (400) and closed: read what it said
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass  # closed with unread bytes of ours: what it sent before counts
    if data:
        status = int(data.split(b" ", 2)[1])
        assert status < 500, data[:300]
    assert server.door.internal_errors == 0  # a dropped connection must be a protocol answer, not a bug


def test_front_door_is_healthy_after_framing_garbage(server: ServerThread) -> None:
    status, _, body = request(server.url, "POST", p.infer_path("toy"), _good_native(), {"Content-Type": p.CONTENT_TYPE})
    assert status == 200, body
