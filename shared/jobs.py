"""The asynchronous job contract between a client and the cloud tier.

Submit: any inference route (native ``POST /v1/models/{m}[/versions/{v}]/infer`` or v2
``POST /v2/models/{m}[/versions/{v}]/infer``) with the header ``Prefer: respond-async`` (RFC 7240)
is answered ``202 Accepted`` with ``Location: /v1/jobs/{id}``, ``Preference-Applied:
respond-async`` and a JSON :class:`JobStatus` document. The inputs are validated at submit as the
synchronous call would validate them (bad input: the same 4xx at once, no job created).

Optional request headers at submit:

- ``Idempotency-Key`` (1-128 characters of ``[A-Za-z0-9._:-]``): a retried submit with the same key
  and model answers the same job (200 when it already existed, 202 when new), never a second job; the
  same key and model with a different request => 409 ``idempotency_conflict``.
- ``X-Tandem-Priority``: an integer in ``MIN_PRIORITY..MAX_PRIORITY`` (0..9, default 0). Jobs always
  run below online traffic; among jobs a higher priority runs first.
- ``X-Tandem-Callback``: an ``http``/``https`` URL; the server POSTs the final status document
  there (JSON) with bounded retries. Any other scheme => 400 at submit.

Then:

- ``GET /v1/jobs/{id}`` -> 200 with the status document; unknown or expired id -> 404; malformed -> 400.
- ``GET /v1/jobs/{id}/result`` -> succeeded: 200 with exactly the body and content type the
  synchronous call would have answered; failed: the synchronous call's error status and body; not
  finished: 202 with the status document and ``Retry-After``.
- ``DELETE /v1/jobs/{id}`` -> 204: cancels a queued job or forgets a finished one; 404 unknown.

Results are kept ``jobs.result_ttl_s`` seconds (default 24 h) after a job finishes, then expire.
Times in the status document are Unix seconds (floats).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import InvalidInput, TandemError

__all__ = [
    "CALLBACK_HEADER",
    "DEFAULT_PRIORITY",
    "DEFAULT_RESULT_TTL_S",
    "IDEMPOTENCY_KEY_HEADER",
    "JOBS_PATH",
    "MAX_IDEMPOTENCY_KEY_LEN",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "PREFERENCE_APPLIED_HEADER",
    "PREFER_HEADER",
    "PRIORITY_HEADER",
    "RESPOND_ASYNC",
    "RETRY_AFTER_HEADER",
    "STATUSES",
    "TERMINAL_STATUSES",
    "JobConflict",
    "JobState",
    "JobStatus",
    "check_callback_url",
    "check_idempotency_key",
    "check_job_id",
    "job_path",
    "new_job_id",
    "parse_priority",
    "prefers_async",
    "result_path",
]

PREFER_HEADER = "Prefer"
RESPOND_ASYNC = "respond-async"
PREFERENCE_APPLIED_HEADER = "Preference-Applied"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
PRIORITY_HEADER = "X-Tandem-Priority"
CALLBACK_HEADER = "X-Tandem-Callback"
RETRY_AFTER_HEADER = "Retry-After"

#: Where jobs live: ``/v1/jobs/{id}`` (status, DELETE) and ``/v1/jobs/{id}/result``.
JOBS_PATH = "/v1/jobs"

#: Job priorities (X-Tandem-Priority on a submit): higher runs first among jobs; every job runs
#: below online traffic whatever its priority.
MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 0

#: Seconds a finished job's status and result are kept by default (``jobs.result_ttl_s``).
DEFAULT_RESULT_TTL_S = 24 * 3600.0

MAX_IDEMPOTENCY_KEY_LEN = 128
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: Job ids are 32 lowercase hex digits (a UUID4 without dashes).
_JOB_ID = re.compile(r"[0-9a-f]{32}")

JobState = Literal["queued", "running", "succeeded", "failed"]
STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed")
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed"})


class JobConflict(TandemError):
    """An Idempotency-Key already names a job of this model submitted with a different request."""

    status = 409
    code = "idempotency_conflict"


def job_path(job_id: str) -> str:
    """``/v1/jobs/{id}``: the job's status document (the ``Location`` of a submit)."""
    return f"{JOBS_PATH}/{job_id}"


def result_path(job_id: str) -> str:
    """``/v1/jobs/{id}/result``: the job's result, as the synchronous call would have answered."""
    return f"{JOBS_PATH}/{job_id}/result"


def new_job_id() -> str:
    import uuid

    return uuid.uuid4().hex


def prefers_async(prefer: str | None) -> bool:
    """Whether a ``Prefer`` header value (RFC 7240; several values, comma separated, each maybe
    with parameters after ``;``) asks for ``respond-async``."""
    if not prefer:
        return False
    for item in prefer.split(","):
        token = item.split(";", 1)[0].split("=", 1)[0].strip().lower()
        if token == RESPOND_ASYNC:
            return True
    return False


def parse_priority(value: str | None) -> int:
    """A job's priority from its X-Tandem-Priority header (None: the default); InvalidInput when
    it is not an integer within MIN_PRIORITY..MAX_PRIORITY."""
    if value is None:
        return DEFAULT_PRIORITY
    try:
        priority = int(value.strip())
    except ValueError:
        raise InvalidInput(f"{PRIORITY_HEADER} must be an integer {MIN_PRIORITY}..{MAX_PRIORITY}, got {value[:40]!r}") from None
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInput(f"{PRIORITY_HEADER} for a job must be within {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
    return priority


def check_job_id(job_id: str) -> str:
    """The id unchanged, or InvalidInput (400) when it cannot be a job id."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidInput(f"malformed job id {str(job_id)[:64]!r}: job ids are 32 lowercase hex digits")
    return job_id


def check_idempotency_key(key: str | None) -> str | None:
    """The key unchanged (None when absent), or InvalidInput naming the rule."""
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            f"{IDEMPOTENCY_KEY_HEADER} must be 1-{MAX_IDEMPOTENCY_KEY_LEN} characters of [A-Za-z0-9._:-], got {key[:40]!r}"
        )
    return key


def check_callback_url(url: str | None) -> str | None:
    """The URL unchanged (None when absent), or InvalidInput unless it is an absolute http(s) URL."""
    if url is None:
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:
        raise InvalidInput(f"{CALLBACK_HEADER} is not a valid URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{CALLBACK_HEADER} must be an absolute http or https URL, got {url[:80]!r}")
    if len(url) > 2048:
        raise InvalidInput(f"{CALLBACK_HEADER} is longer than 2048 characters")
    return url.strip()


@dataclass(frozen=True, slots=True)
class JobStatus:
    """The status document of one job (``GET /v1/jobs/{id}``; also the 202 body of a submit and
    what a callback receives)."""

    id: str
    model: str
    #: The version named at submit, else the version that served (or would serve) it.
    version: str | None
    status: JobState
    priority: int
    created: float
    started: float | None = None
    finished: float | None = None
    #: None, or the synchronous call's error: {"error": message, "code": code, "status": http status}.
    error: dict[str, Any] | None = None
    #: ``/v1/jobs/{id}/result`` once the job succeeded or failed, else None.
    result: str | None = None
    #: When the job and its result are forgotten (Unix seconds); None while it is not finished.
    expires: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> JobStatus:
        """Parse a status document; InvalidInput naming the field when it is not one."""
        if not isinstance(doc, dict):
            raise InvalidInput("a job status document must be a JSON object")
        missing = {"id", "model", "status", "priority", "created"} - set(doc)
        if missing:
            raise InvalidInput(f"job status document lacks {', '.join(sorted(missing))}")
        if doc["status"] not in STATUSES:
            raise InvalidInput(f"job status must be one of {', '.join(STATUSES)}, got {doc['status']!r}")
        error = doc.get("error")
        if error is not None and not isinstance(error, dict):
            raise InvalidInput("job status 'error' must be null or an object")

        def num(name: str) -> float | None:
            v = doc.get(name)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidInput(f"job status {name!r} must be a number of Unix seconds")
            return float(v)

        try:
            return cls(
                id=str(doc["id"]),
                model=str(doc["model"]),
                version=None if doc.get("version") is None else str(doc["version"]),
                status=doc["status"],
                priority=int(doc["priority"]),
                created=float(doc["created"]),
                started=num("started"),
                finished=num("finished"),
                error=error,
                result=doc.get("result"),
                expires=num("expires"),
            )
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"malformed job status document: {e}") from None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES
