"""Tandem's edge tier: the on-device runtime, the cloud client, the router and ``HybridClient``.

Imports are lazy so that ``tandem`` CLI start-up (which imports ``tandem.edge.cli``) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["HybridClient", "Budget", "Result", "Route", "RouterConfig", "Decision", "Policy"]

if TYPE_CHECKING:
    from .budget import Budget
    from .client import HybridClient, Result, Route
    from .policies import Decision, Policy
    from .router import RouterConfig

_WHERE = {
    "HybridClient": "client",
    "Result": "client",
    "Route": "client",
    "Budget": "budget",
    "RouterConfig": "router",
    "Decision": "policies",
    "Policy": "policies",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'tandem.edge' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{mod}", __name__), name)
