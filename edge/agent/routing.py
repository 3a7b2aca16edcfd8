"""The router the agent runs for apps on the device, one per tracked model and active version.

The router is the same :class:`tandem.edge.client.HybridClient` a Python app embeds, so a C++ or Swift
app calling the local API gets the same edge/cloud decisions. :class:`RouterSlot` holds the current
one and swaps it when a new version is activated: calls in flight finish on the old router, which is
closed once the last of them returns (so an update never fails a call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tandem.shared.bundle import Bundle
from tandem.shared.errors import InferenceFailed, InvalidInput, Unavailable

from .config import AgentConfig
from .store import EDGE_ROLE, make_session

log = logging.getLogger(__name__)

BUDGET_FIELDS = ("latency_ms", "max_cost", "local_only", "policy", "target_accuracy")


class Router:
    """One model version behind the router: ``await infer(inputs, budget) -> (outputs, route dict)``."""

    def __init__(self, bundle: Bundle, config: AgentConfig) -> None:
        self.bundle = bundle
        self.name = bundle.name
        self.version = bundle.version
        self._client: Any = None
        self._fallback: _EdgeOnly | None = None
        try:
            from tandem.edge.client import HybridClient
        except ImportError as e:  # the router is another module of this package; keep serving without it
            log.warning("HybridClient unavailable (%s): serving %s edge-only", e, self.name)
            self._fallback = _EdgeOnly(bundle, config.intra_op_threads)
            return
        self._client = HybridClient(
            bundle,
            config.cloud_url,
            api_key=config.api_key,
            trusted_keys=[str(k) for k in config.trusted_keys],
            policy=config.policy,
            config={"intra_op_threads": config.intra_op_threads, **config.router},
        )

    async def infer(self, inputs: Mapping[str, np.ndarray], budget: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if self._client is None:
            assert self._fallback is not None
            return await self._fallback.infer(inputs, budget)
        from tandem.edge.budget import Budget

        result = await self._client.ainfer(dict(inputs), Budget(**budget))
        return dict(result.outputs), result.route.to_dict()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._fallback is not None:
            self._fallback.close()


class _EdgeOnly:
    """Used only when the router module is missing: the edge variant, nothing else."""

    def __init__(self, bundle: Bundle, threads: int) -> None:
        self._session = make_session(bundle.path / bundle.variant(EDGE_ROLE).file, threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-edge")
        self._names = {i.name for i in self._session.get_inputs()}

    async def infer(self, inputs: Mapping[str, np.ndarray], budget: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if budget.get("policy") == "cloud-only":
            raise Unavailable("this agent runs without the router: only the edge is available")
        if set(inputs) != self._names:
            raise InvalidInput(f"inputs {sorted(inputs)} do not match the model's {sorted(self._names)}")
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            values = await loop.run_in_executor(self._pool, self._session.run, None, dict(inputs))
        except Exception as e:
            raise InferenceFailed(f"edge inference failed: {e}") from None
        outputs = {o.name: v for o, v in zip(self._session.get_outputs(), values)}
        route = {"tier": "edge", "reason": "router unavailable: edge only", "policy": "edge-only",
                 "latency_ms": (time.perf_counter() - t0) * 1e3, "cost": 0.0, "confidence": None,
                 "fallbacks": [], "estimates": {}}
        return outputs, route

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class RouterSlot:
    """The current router of one model, swapped without failing calls in flight."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._inflight: dict[int, int] = {id(router): 0}
        self._retired: dict[int, Router] = {}

    @property
    def router(self) -> Router:
        return self._router

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Router]:
        router = self._router
        key = id(router)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        try:
            yield router
        finally:
            self._inflight[key] -= 1
            if key in self._retired and self._inflight[key] == 0:
                await self._close(key)

    async def swap(self, router: Router) -> None:
        old = self._router
        self._router = router
        self._inflight.setdefault(id(router), 0)
        self._retired[id(old)] = old
        if self._inflight.get(id(old), 0) == 0:
            await self._close(id(old))

    async def aclose(self) -> None:
        for key in list(self._retired):
            await self._close(key)
        await self._router.aclose()

    async def _close(self, key: int) -> None:
        old = self._retired.pop(key)
        self._inflight.pop(key, None)
        try:
            await old.aclose()
        except Exception:
            log.exception("closing the router of %s:%s failed", old.name, old.version)


def budget_from(parameters: Mapping[str, Any], headers: Mapping[str, str], deadline_ms: float | None) -> dict[str, Any]:
    """The call's budget from the request's ``parameters`` (wins) or ``X-Tandem-*`` headers, validated."""
    unknown = set(parameters) - set(BUDGET_FIELDS)
    if unknown:
        raise InvalidInput(
            f"unknown parameter(s) {', '.join(sorted(map(str, unknown)))}; the budget takes {', '.join(BUDGET_FIELDS)}"
        )
    b: dict[str, Any] = {}
    hdr = {"latency_ms": "X-Tandem-Latency-Ms", "max_cost": "X-Tandem-Max-Cost",
           "local_only": "X-Tandem-Local-Only", "policy": "X-Tandem-Policy",
           "target_accuracy": "X-Tandem-Target-Accuracy"}
    for key, header in hdr.items():
        if key in parameters:
            b[key] = parameters[key]
        elif header in headers:
            raw = headers[header]
            if key == "policy":
                b[key] = raw
            elif key == "local_only":
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise InvalidInput(f"header {header} must be true or false, got {raw!r}")
                b[key] = raw.lower() in ("1", "true", "yes")
            else:
                try:
                    b[key] = float(raw)
                except ValueError:
                    raise InvalidInput(f"header {header} must be a number, got {raw!r}") from None
    if "latency_ms" not in b and deadline_ms is not None:
        b["latency_ms"] = deadline_ms
    for key in ("latency_ms", "max_cost", "target_accuracy"):
        v = b.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v or v < 0):
            raise InvalidInput(f"budget {key} must be a non-negative number, got {v!r}")
    if "local_only" in b and not isinstance(b["local_only"], bool):
        raise InvalidInput(f"budget local_only must be true or false, got {b['local_only']!r}")
    policies = ("edge-only", "cloud-only", "constrained", "cascade", "hedged")
    if b.get("policy") is not None and b["policy"] not in policies:
        raise InvalidInput(f"unknown policy {b['policy']!r}; expected one of {', '.join(policies)}")
    if b.get("latency_ms") == 0:
        raise InvalidInput("budget latency_ms must be positive")
    return b
