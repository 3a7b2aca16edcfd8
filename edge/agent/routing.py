"""The router the agent runs for apps on the device, one per tracked model and active version.

The router is the same :class:`tandem.edge.client.HybridClient` a Python app embeds, so a C++ or Swift
app calling the local API gets the same edge/cloud decisions. :class:`RouterSlot` holds the current
one and swaps it when a new version is activated: calls in flight finish on the old router, which is
closed once the last of them returns (so an update never fails a call).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np

from tandem.shared.bundle import Bundle
from tandem.shared.errors import InvalidInput

from .config import AgentConfig

log = logging.getLogger(__name__)

BUDGET_FIELDS = ("latency_ms", "max_cost", "local_only", "policy", "target_accuracy")


class Router:
    """One model version behind the router: ``await infer(inputs, budget) -> (outputs, route dict)``."""

    def __init__(self, bundle: Bundle, config: AgentConfig) -> None:
        from tandem.edge.client import HybridClient

        self.name = bundle.name
        self.version = bundle.version
        tracked = config.tracked(bundle.name)
        ref = tracked.confidence if tracked else None
        self._client = HybridClient(
            bundle,  # already verified by the store
            config.cloud_url,
            api_key=config.api_key,
            policy=(tracked.policy if tracked and tracked.policy else config.policy),
            config={"intra_op_threads": config.intra_op_threads, **config.router},
            confidence=load_confidence(ref) if ref else None,
        )

    async def infer(self, inputs: Mapping[str, np.ndarray], budget: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from tandem.edge.budget import Budget

        result = await self._client.ainfer(dict(inputs), Budget(**budget))
        return dict(result.outputs), result.route.to_dict()

    async def aclose(self) -> None:
        await self._client.aclose()


def load_confidence(ref: str) -> Any:
    """The function ``package.module:function`` names; :class:`InvalidInput` saying what is wrong."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise InvalidInput(f"confidence {ref!r}: module {module_name!r} cannot be imported: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InvalidInput(f"confidence {ref!r}: {module_name} has no function {attr!r}")
    return fn


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
