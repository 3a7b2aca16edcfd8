"""Open Inference Protocol v2 (REST) handlers, complete enough for an unmodified ``tritonclient.http``.

Health, server and model metadata, model config, infer (JSON tensors and the binary tensor
extension, via :mod:`tandem.shared.v2`) and the model repository extension (index, load, unload).
Errors are JSON ``{"error": ..., "code": ...}`` with the right status (the app's middleware).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web

from tandem.shared import __version__, v2
from tandem.shared.errors import InvalidInput, Unavailable

from .body import read_body
from .control import ModelControl
from .inference import Inference, Outcome, deadline_seconds, header_dict, header_lines
from .metrics import Metrics, model_statistics
from .repository import ModelRepository
from .wire import Decoded, respond

__all__ = ["V2API", "V2", "reply"]

_EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "schedule_policy", "statistics"]


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type="application/json")


async def _json_body(request: web.Request, timeout_s: float) -> dict[str, Any]:
    raw = await read_body(request, 1 << 20, timeout_s)
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also an integer of too many digits
        raise InvalidInput(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidInput("request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


#: JSON headers remembered with their inputs' layout, and the longest header remembered.
_MAX_PLANS, _MAX_PLAN_HEADER = 64, 4096
#: A remembered header's request (without inputs), its inputs (name, dtype, shape, bytes), their bytes.
_Plan = tuple[v2.V2Request, list[tuple[str, np.dtype, tuple[int, ...], int]], int]


class _V2:
    option_header = v2.HEADER_LENGTH
    compresses = True

    def __init__(self) -> None:
        self._plans: dict[bytes, _Plan] = {}

    def decode(self, body: bytes | memoryview, option: str | None, deadline: str | None) -> Decoded:
        req = self._parse(body, option)
        outputs = [o.name for o in req.outputs] if req.outputs is not None else None
        timeout_us = req.timeout_us()
        timeout_s = deadline_seconds(deadline, timeout_us / 1000 if timeout_us is not None else None)
        return req, outputs, req.priority(), timeout_s

    def reply(self, inference: Inference, outcome: Outcome, request: v2.V2Request, request_id: str) -> tuple[str, bytes]:
        served = outcome.model
        body, headers = v2.encode_infer_response(served.name, served.version, outcome.outputs, request=request, id=request.id)
        return header_lines(headers) + inference.header_text(outcome), body


    def _parse(self, body: bytes | memoryview, header_length: str | None) -> v2.V2Request:
        """:func:`v2.parse_infer_request`, without parsing a JSON header seen before again.

        tritonclient sends the same header call after call with new tensor bytes. When every input
        of a header came from the binary part (numeric, not BOOL, whose bytes need checking), the
        header alone fixes where each lies: the next body with it has its inputs at the same offsets.
        """
        hl = int(header_length) if header_length is not None and header_length.isdigit() else 0
        header = bytes(body[:hl]) if 0 < hl <= min(len(body), _MAX_PLAN_HEADER) else b""
        plan = self._plans.get(header) if header else None
        if plan is not None and len(body) - hl == plan[2]:
            template, offset, inputs = plan[0], hl, {}
            for name, dtype, shape, size in plan[1]:
                inputs[name] = np.frombuffer(body, dtype, size // dtype.itemsize, offset).reshape(shape)
                offset += size
            outputs = list(template.outputs) if template.outputs is not None else None
            return v2.V2Request(inputs, template.id, dict(template.parameters), outputs, template.binary_output)
        req = v2.parse_infer_request(body, header_length)
        tensors = [(name, a.dtype, a.shape, a.nbytes) for name, a in req.inputs.items()]
        if header and sum(t[3] for t in tensors) == len(body) - hl and all(t[1].kind not in "Ob" for t in tensors):
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            template = v2.V2Request({}, req.id, req.parameters, req.outputs, req.binary_output)
            self._plans[header] = (template, tensors, len(body) - hl)
        return req


#: Open Inference Protocol v2 (JSON and binary tensors).
V2 = _V2()


def reply(inference: Inference, outcome: Outcome, req: v2.V2Request) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a successful v2 answer, uncompressed (the job runner's)."""
    head, body = V2.reply(inference, outcome, req, "")
    return body, header_dict(head)


class V2API:
    def __init__(
        self, inference: Inference, repository: ModelRepository, is_ready: Any, max_body_bytes: int, read_timeout_s: float,
        metrics: Metrics, *, control: Callable[[], ModelControl] | None = None,
    ) -> None:
        self._read_timeout = read_timeout_s
        self._metrics = metrics
        self._control = control or (lambda: repository)
        self._inference = inference
        self._max_body = max_body_bytes
        self._repo = repository
        self._is_ready = is_ready

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/stats", self.statistics)  # before /v2/models/{model}, which it would match
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_get(base + "/stats", self.statistics)
            r.add_post(base + "/infer", self.infer)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if not self._is_ready():
            raise Unavailable("server is not ready")
        return web.Response(status=200)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": "tandem", "version": __version__, "extensions": _EXTENSIONS})

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version")
        served = self._repo.get(name, version)
        versions = [version] if version else self._repo.versions(name)
        return _json(served.metadata(versions))

    async def model_ready(self, request: web.Request) -> web.Response:
        self._repo.get(request.match_info["model"], request.match_info.get("version"))
        return web.Response(status=200)

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(self._repo.get(request.match_info["model"], request.match_info.get("version")).model_config())

    async def statistics(self, request: web.Request) -> web.Response:
        """The statistics extension: every loaded version, or those of one model, or one version."""
        name, version = request.match_info.get("model"), request.match_info.get("version")
        if name is None:
            served = self._repo.loaded()
        elif version is None:
            self._repo.get(name)  # an unknown or unloaded model answers as on every other route
            served = [self._repo.get(name, v) for v in self._repo.versions(name)]
        else:
            served = [self._repo.get(name, version)]
        values = self._metrics.snapshot()
        caches = self._inference.caches_responses
        return _json({"model_stats": [model_statistics(values, m.name, m.version, caches) for m in served]})

    async def infer(self, request: web.Request) -> web.Response:
        return await respond(V2, self._inference, request, self._max_body, self._read_timeout)

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await _json_body(request, self._read_timeout)
        rows = self._repo.index()
        if doc.get("ready") is True:
            rows = [r for r in rows if r["state"] == "READY"]
        return _json(rows)

    async def load(self, request: web.Request) -> web.Response:
        doc = await _json_body(request, self._read_timeout)
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        if any(k == "config" or k.startswith("file:") for k in params):
            raise InvalidInput("load overrides (config, file:) are not supported: put the bundle in the repository")
        await self._control().load(request.match_info["model"])
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await _json_body(request, self._read_timeout)
        await self._control().unload(request.match_info["model"])
        return web.Response(status=200)
