"""The job API on the aiohttp app: async submits on the infer routes, and ``/v1/jobs/{id}``.

A ``POST`` to any infer route (native or v2, with or without a version) carrying ``Prefer:
respond-async`` is taken by :func:`job_middleware` before the route's handler: the request is
validated and stored as a job, and answered ``202 Accepted`` (``200`` when an Idempotency-Key names
a job that already exists) with ``Location``, ``Preference-Applied`` and the status document. The
front door (:mod:`.front`) hands such requests to aiohttp. Errors go through the app's middleware
(auth first, then the usual error bodies: msgpack on native routes, JSON elsewhere).

See :mod:`tandem.shared.jobs` for the contract.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tandem.shared.jobs import (
    JOBS_PATH,
    PREFER_HEADER,
    PREFERENCE_APPLIED_HEADER,
    RESPOND_ASYNC,
    RETRY_AFTER_HEADER,
    job_path,
    prefers_async,
)

from .body import read_body
from .inference import MODEL_KEY
from .jobs import JobService, open_queue

__all__ = ["JOBS_KEY", "attach_jobs", "job_middleware"]

JOBS_KEY = web.AppKey("tandem_jobs", JobService)
#: Retry-After (seconds) of a result asked for before the job finished.
_RETRY_AFTER_S = 1


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type="application/json", headers=headers)


def job_middleware(service: JobService, max_body_bytes: int, read_timeout_s: float) -> Any:
    """Takes ``Prefer: respond-async`` POSTs to infer routes; everything else passes through."""
    limit = min(max_body_bytes, service.config.max_payload_bytes)

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST" or not prefers_async(request.headers.get(PREFER_HEADER)):
            return await handler(request)
        path = request.path
        model = request.match_info.get("model")
        if model is None or not path.endswith("/infer") or not path.startswith(("/v1/models/", "/v2/models/")):
            return await handler(request)
        version = request.match_info.get("version")
        protocol = "v1" if path.startswith("/v1/") else "v2"
        request[MODEL_KEY] = service.inference.resolve(model, version)
        body = await read_body(request, limit, read_timeout_s)
        job, created = await service.submit(protocol, model, version, body, request.headers)
        headers = {"Location": job_path(job.id), PREFERENCE_APPLIED_HEADER: RESPOND_ASYNC}
        return _json(job.status_document().to_dict(), 202 if created else 200, headers)

    return middleware


class _JobRoutes:
    def __init__(self, service: JobService) -> None:
        self.service = service

    async def status(self, request: web.Request) -> web.Response:
        job = await self.service.get(request.match_info["id"])
        return _json(job.status_document().to_dict())

    async def result(self, request: web.Request) -> web.Response:
        job = await self.service.get(request.match_info["id"])
        if job.result_status is None:
            return _json(job.status_document().to_dict(), 202, {RETRY_AFTER_HEADER: str(_RETRY_AFTER_S)})
        return web.Response(status=job.result_status, body=job.result_body or b"", headers=job.result_headers)

    async def delete(self, request: web.Request) -> web.Response:
        await self.service.delete(request.match_info["id"])
        return web.Response(status=204)


def attach_jobs(
    app: web.Application, config: Any, inference: Any, is_ready: Any, drain_left: Callable[[], float] | None = None
) -> JobService:
    """Open the configured queue, add the job routes and the submit middleware to ``app``, and
    start/stop the service with it (jobs run once ``is_ready()``: every model loaded; at the stop,
    runs in hand get ``drain_left()`` seconds, by default ``shutdown_timeout_s``)."""
    queue = open_queue(config)
    service = JobService(config.jobs, queue, inference, run_jobs=config.jobs.queue == "embedded", ready=is_ready)
    app[JOBS_KEY] = service
    app.middlewares.append(job_middleware(service, config.max_body_bytes, config.read_timeout_s))
    routes = _JobRoutes(service)
    app.router.add_get(JOBS_PATH + "/{id}", routes.status)
    app.router.add_get(JOBS_PATH + "/{id}/result", routes.result)
    app.router.add_delete(JOBS_PATH + "/{id}", routes.delete)

    async def start(app: web.Application) -> None:
        await service.start()

    async def stop(app: web.Application) -> None:
        await service.close(drain_left() if drain_left is not None else config.shutdown_timeout_s)

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return service
