"""Input errors on every route answer 4xx with the usual error body, and log no traceback.

Each case once raised past the codecs (ValueError for integers of more than 4300 digits,
RecursionError for deep nesting, OverflowError for numbers beyond a float or SQLite's INTEGER)
and was answered 500 with a traceback in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cloud_support import ServerThread, make_repository, request
from tandem.cloud.config import ServerConfig
from tandem.shared import protocol as p
from tandem.shared.tensors import packb, unpackb

BIG_INT = "9" * 5000  # more digits than Python converts to int by default (4300)
DEEP_JSON = "[" * 100_000 + "]" * 100_000
FEEDBACK_ID = "6f1c2a3e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[ServerThread]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), keys[0], toy_versions=("1",), slow=False, varlen=False)
    config = ServerConfig(repository=repo, trusted_keys=[keys[1]], port=0, warmup_batch_sizes=[1], access_log=False)
    with ServerThread(config) as s:
        yield s


@pytest.fixture
def log() -> Iterator[_Records]:
    """Every record logged meanwhile, from any thread (the server's included)."""
    handler = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _assert_4xx(status: int, raw: bytes, native: bool = False) -> dict[str, Any]:
    assert 400 <= status < 500, (status, raw[:300])
    doc = unpackb(raw) if native else json.loads(raw)
    assert isinstance(doc["error"], str) and doc["error"] and isinstance(doc["code"], str), doc
    return doc


def _assert_no_traceback(log: _Records) -> None:
    bad = [r for r in log.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [(r.name, r.getMessage()[:200]) for r in bad]


def _v2_json(data: str, extra: str = "") -> bytes:
    return (
        '{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [' + data + "]}]" + extra + "}"
    ).encode()


@pytest.mark.parametrize("keep_alive", [True, False], ids=["front-door", "aiohttp"])
def test_v2_infer_with_huge_integers_is_a_400(server: ServerThread, log: _Records, keep_alive: bool) -> None:
    # Connection: close hands the request to aiohttp: both HTTP stacks call the same codec.
    headers = {} if keep_alive else {"Connection": "close"}
    for body in (
        _v2_json(BIG_INT + ", " + ", ".join(["1"] * 63)),
        _v2_json(", ".join(["1"] * 64), ', "parameters": {"priority": ' + BIG_INT + "}"),
        _v2_json(", ".join(["1"] * 64), ', "parameters": {"timeout": ' + BIG_INT + "}"),
        _v2_json(", ".join(["1"] * 64), ', "id": ' + BIG_INT),
        ('{"inputs": [{"name": "input", "shape": [' + BIG_INT + ', 64], "datatype": "FP32", "data": [1]}]}').encode(),
        DEEP_JSON.encode(),
    ):
        status, _, raw = request(server.url, "POST", "/v2/models/toy/infer", body, headers)
        doc = _assert_4xx(status, raw)
        assert "JSON" in doc["error"] or "nested" in doc["error"], doc
    _assert_no_traceback(log)


def test_v2_infer_with_an_integer_beyond_any_float_is_served(server: ServerThread, log: _Records) -> None:
    # 10**400 microseconds fits no float: as far off as no deadline at all, so the request is served.
    body = _v2_json(", ".join(["1"] * 64), ', "parameters": {"timeout": 1' + "0" * 400 + "}")
    status, _, raw = request(server.url, "POST", "/v2/models/toy/infer", body)
    assert status == 200, raw[:300]
    for deadline in ("1e400", "inf"):
        status, _, raw = request(server.url, "POST", p.infer_path("toy"), _native_request(), {p.HEADER_DEADLINE_MS: deadline})
        assert status == 200, raw[:300]
    _assert_no_traceback(log)


def _native_request(**extra: Any) -> bytes:
    import numpy as np

    return p.InferRequest({"input": np.ones((1, 64), np.float32)}, **extra).to_wire()


def test_native_infer_with_deep_msgpack_is_a_400(server: ServerThread, log: _Records) -> None:
    deep = b"\x91" * 5000 + b"\x01"  # 5000 nested one-element arrays
    body = b"\x82\xa6inputs\x80\xaaparameters\x81\xa1x" + deep
    status, _, raw = request(server.url, "POST", p.infer_path("toy"), body)
    _assert_4xx(status, raw, native=True)
    _assert_no_traceback(log)


@pytest.mark.parametrize("path", ["/v2/repository/index", "/v2/repository/models/toy/load", "/v2/repository/models/toy/unload"])
def test_repository_control_bodies_that_json_cannot_take_are_a_400(server: ServerThread, log: _Records, path: str) -> None:
    for body in (DEEP_JSON, '{"parameters": ' + DEEP_JSON + "}", '{"ready": ' + BIG_INT + "}"):
        status, _, raw = request(server.url, "POST", path, body.encode(), {"Content-Type": "application/json"})
        doc = _assert_4xx(status, raw)
        assert "JSON" in doc["error"] or "nested" in doc["error"], doc
    _assert_no_traceback(log)
    assert server.state.repository.get("toy").version == "1"  # nothing was unloaded


def _feedback(record: dict[str, Any]) -> dict[str, Any]:
    return {"records": [{"id": FEEDBACK_ID, "kind": "feedback", "model": "toy", "created_at": 1.0, **record}]}


def _post_feedback(server: ServerThread, body: bytes, msgpack_body: bool = False) -> tuple[int, bytes]:
    content_type = p.CONTENT_TYPE if msgpack_body else "application/json"
    status, _, raw = request(server.url, "POST", "/v1/feedback", body, {"Content-Type": content_type})
    return status, raw


def test_feedback_bodies_that_json_cannot_take_are_a_400(server: ServerThread, log: _Records) -> None:
    deep_label = json.dumps(_feedback({}))[:-3] + ', "label": ' + DEEP_JSON + "}]}"
    cases = [
        (DEEP_JSON.encode(), "nested"),
        (deep_label.encode(), "nested"),
        (json.dumps(_feedback({}))[:-3].encode() + b', "label": ' + BIG_INT.encode() + b"}]}", "JSON"),
        (json.dumps(_feedback({"created_at": 0})).replace('"created_at": 0', '"created_at": 1' + "0" * 400).encode(), "created_at"),
        (json.dumps(_feedback({"model": "\ud800"})).encode(), "model"),  # JSON's \ud800 escape: a lone surrogate
        (json.dumps(_feedback({"label": {"text": "\ud800"}})).encode(), "label"),
    ]
    for body, words in cases:
        status, raw = _post_feedback(server, body)
        doc = _assert_4xx(status, raw)
        assert words in doc["error"], doc
    _assert_no_traceback(log)


def test_feedback_msgpack_labels_nested_deep_are_a_400(server: ServerThread, log: _Records) -> None:
    label: Any = 1
    for _ in range(900):  # deep enough to exhaust the JSON codec's recursion limit, not msgpack's
        label = [label]
    body = packb(_feedback({"label": label}))
    status, raw = _post_feedback(server, body, msgpack_body=True)
    doc = _assert_4xx(status, raw, native=True)
    assert "records[0].label" in doc["error"] and "nested" in doc["error"], doc
    # Just within the bound: stored, and read back in both formats.
    label = 1
    for _ in range(64):
        label = [label]
    status, raw = _post_feedback(server, packb(_feedback({"label": label, "id": "6f1c2a3e-1d2b-4c5d-8e9f-0a1b2c3d4e60"})), msgpack_body=True)
    assert status == 200 and unpackb(raw)["accepted"] == 1, raw
    status, _, raw = request(server.url, "GET", "/v1/feedback?model=toy", headers={"Accept": p.CONTENT_TYPE})
    assert status == 200 and unpackb(raw)["records"][-1]["label"] == label
    status, _, raw = request(server.url, "GET", "/v1/feedback?model=toy")
    assert status == 200 and json.loads(raw)["records"][-1]["label"] == label
    _assert_no_traceback(log)
    assert msgpack is not None


def test_feedback_query_numbers_beyond_sqlite_are_a_400(server: ServerThread, log: _Records) -> None:
    for query in (f"after={2**70}", f"after={2**63}", f"after={BIG_INT}", f"limit={2**70}", "after=-1"):
        status, _, raw = request(server.url, "GET", "/v1/feedback?" + query)
        doc = _assert_4xx(status, raw)
        assert "after" in doc["error"] or "limit" in doc["error"], doc
    status, _, raw = request(server.url, "GET", f"/v1/feedback?after={2**63 - 1}")
    assert status == 200 and json.loads(raw)["records"] == []
    _assert_no_traceback(log)


def test_registry_ranges_with_huge_numbers_are_a_4xx(server: ServerThread, log: _Records) -> None:
    path = "/v1/registry/models/toy/versions/1/manifest"
    status, _, manifest = request(server.url, "GET", path)
    assert status == 200
    name = json.loads(manifest)["variants"][0]["file"]
    url = f"/v1/registry/models/toy/versions/1/files/{name}"
    for header in (f"bytes={BIG_INT}-", f"bytes=0-{BIG_INT}", f"bytes=-{BIG_INT}", f"bytes={2**70}-{2**71}", "bytes=" + "0" * 5000 + "1-"):
        status, headers, raw = request(server.url, "GET", url, headers={"Range": header})
        assert status < 500, (header[:40], status, raw[:200])
        if status >= 400:
            _assert_4xx(status, raw)
    status, _, raw = request(server.url, "GET", url, headers={"Range": f"bytes=0-{BIG_INT}"})
    assert status == 200  # to the end of the file: the whole of it
    _assert_no_traceback(log)


def test_every_overload_answer_carries_a_sane_retry_after() -> None:
    from tandem.cloud.gate import MAX_RETRY_AFTER_S, retry_after_seconds

    assert retry_after_seconds(0.2) == 1
    assert retry_after_seconds(2.1) == 3
    assert retry_after_seconds(float("inf")) == MAX_RETRY_AFTER_S
    assert retry_after_seconds(float("nan")) == 1
    assert retry_after_seconds(10**400) == MAX_RETRY_AFTER_S
