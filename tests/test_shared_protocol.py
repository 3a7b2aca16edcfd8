"""Error replies decode to the same exception whichever protocol's body carries them."""

from __future__ import annotations

import json

import pytest

from tandem.shared.errors import InvalidInput, NotFound, Overloaded, TandemError, Unavailable
from tandem.shared.protocol import error_body, error_from_reply


@pytest.mark.parametrize(("status", "raw", "cls", "message"), [
    (400, error_body("bad shape", "invalid_input"), InvalidInput, "bad shape"),
    (404, json.dumps({"error": "no model 'x'", "code": "not_found"}).encode(), NotFound, "no model 'x'"),
    (429, json.dumps({"error": "queue is full", "code": "overloaded"}).encode(), Overloaded, "queue is full"),
    (503, b"<html>proxy error</html>", Unavailable, "HTTP 503"),
    (502, b"", TandemError, "HTTP 502"),
    (400, b"{not json", InvalidInput, "HTTP 400"),
])
def test_error_from_reply(status: int, raw: bytes, cls: type[TandemError], message: str) -> None:
    err = error_from_reply(status, raw)
    assert type(err) is cls and err.message == message
