"""One error hierarchy for all of Tandem.

Each error maps to one HTTP status and one body shape (``{"error": message, "code": code}``), so a
server can turn any of them into a response and a client can turn a response back into the same
exception type.
"""

from __future__ import annotations

from typing import Any


class TandemError(Exception):
    """Base of every error Tandem raises on purpose."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


# --- request errors (4xx) -------------------------------------------------------------------------


class InvalidInput(TandemError):
    """The request is malformed or does not match the model's signature."""

    status = 400
    code = "invalid_input"


class TensorCodecError(InvalidInput):
    """A tensor payload cannot be decoded (bad dtype, shape vs byte length, truncated, wrong types)."""

    code = "bad_tensor"


class Unauthorized(TandemError):
    status = 401
    code = "unauthorized"


class ModelNotFound(TandemError):
    status = 404
    code = "model_not_found"


class NotFound(TandemError):
    status = 404
    code = "not_found"


class RequestTimeout(TandemError):
    """The client started a request and then stopped sending it."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(TandemError):
    status = 413
    code = "payload_too_large"


class NoConfidence(InvalidInput):
    """The cascade was asked for, but the edge has no confidence to decide with: a task without
    max-softmax scores whose bundle has no confidence head, and no confidence function was passed."""

    code = "no_confidence"


class NotSupported(TandemError):
    """The server understood the request but does not do this in its configuration."""

    status = 501
    code = "not_supported"


# --- server state errors (5xx) --------------------------------------------------------------------


class Overloaded(TandemError):
    """The queue is full; retry after ``retry_after`` seconds."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class DeadlineUnreachable(Overloaded):
    """Refused on arrival: the work already queued would outlast the request's deadline."""

    code = "deadline_unreachable"


class Unavailable(TandemError):
    """The model or server cannot serve right now (not ready, shutting down, unreachable)."""

    status = 503
    code = "unavailable"


class DeadlineExceeded(TandemError):
    """The request's deadline passed before it could be served."""

    status = 504
    code = "deadline_exceeded"


class InferenceFailed(TandemError):
    status = 500
    code = "inference_failed"


# --- bundle errors --------------------------------------------------------------------------------


class BundleError(TandemError):
    """A bundle cannot be loaded. Nothing is half-loaded: the caller gets this or a whole bundle."""

    status = 422
    code = "bad_bundle"


class BundleNotFound(BundleError):
    code = "bundle_not_found"


class ManifestError(BundleError):
    """manifest.json is missing, is not valid JSON, or does not match the schema."""

    code = "bad_manifest"


class UnsupportedSchema(ManifestError):
    code = "unsupported_schema"


class MissingFile(BundleError):
    code = "missing_file"


class HashMismatch(BundleError):
    code = "hash_mismatch"


class UnsafePath(BundleError):
    """A path in the manifest or an archive escapes the bundle directory."""

    code = "unsafe_path"


class SignatureError(BundleError):
    """Base for signature problems."""

    code = "bad_signature"


class MissingSignature(SignatureError):
    code = "missing_signature"


class UntrustedSignature(SignatureError):
    """The signature is valid for some key, but not for any trusted key (or does not verify)."""

    code = "untrusted_signature"


class BadKey(TandemError):
    """A key file cannot be read."""

    status = 400
    code = "bad_key"


_BY_CODE: dict[str, type[TandemError]] = {}


def _index(cls: type[TandemError]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _index(sub)


_index(TandemError)


def error_from_body(status: int, body: Any) -> TandemError:
    """Rebuild the exception a server sent (``{"error", "code"}``), falling back on the status."""
    message = f"HTTP {status}"
    code = None
    if isinstance(body, dict):
        message = str(body.get("error") or message)
        code = body.get("code")
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = {
            400: InvalidInput,
            401: Unauthorized,
            404: NotFound,
            408: RequestTimeout,
            413: PayloadTooLarge,
            429: Overloaded,
            503: Unavailable,
            504: DeadlineExceeded,
        }.get(status, TandemError)
    err = cls.__new__(cls)
    TandemError.__init__(err, message)
    if isinstance(err, Overloaded):
        err.retry_after = 1.0
    return err
