"""What ``tandem agent status`` shows, read from the data directory (works while the agent runs)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .lock import lock_holder
from .outbox import read_stats
from .store import ACTIVE_NAME, STATE_NAME, read_json


def collect(data_dir: str | Path) -> dict[str, Any]:
    d = Path(data_dir)
    runtime = read_json(d / "agent.json")
    models: dict[str, Any] = {}
    models_dir = d / "models"
    if models_dir.is_dir():
        for m in sorted(p for p in models_dir.iterdir() if p.is_dir()):
            active = read_json(m / ACTIVE_NAME, {}) or {}
            state = read_json(m / STATE_NAME, {}) or {}
            models[m.name] = {
                "active": active.get("version"),
                "history": active.get("history", []),
                "installed": sorted(p.name for p in m.iterdir() if p.is_dir() and not p.name.startswith(".")),
                "last_attempt": state.get("last_attempt"),
                "refused": state.get("refused", {}),
            }
    outbox = read_stats(d / "outbox.sqlite")
    mix = None
    if outbox:
        total = outbox["route_edge"] + outbox["route_cloud"] + outbox["route_failed"]
        mix = {"edge": outbox["route_edge"], "cloud": outbox["route_cloud"], "failed": outbox["route_failed"],
               "cloud_share": (outbox["route_cloud"] / total) if total else None}
    holder = lock_holder(d)
    # The lock says whether an agent is there at all; agent.json, whether it is serving yet (it is
    # written once the store is recovered and the sockets are bound).
    running = holder is not None and _alive(runtime)
    starting = holder is not None and not running
    return {"data_dir": str(d), "running": running, "starting": starting,
            "starting_pid": holder if starting else None, "agent": runtime, "models": models, "outbox": outbox, "route_mix": mix}


def _alive(runtime: Any) -> bool:
    """agent.json outlives a killed agent: trust it only if its process is still there."""
    if not isinstance(runtime, dict) or not isinstance(runtime.get("pid"), int):
        return False
    try:
        os.kill(runtime["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_status(s: dict[str, Any]) -> str:
    if s["running"]:
        state = f"running at {s['agent']['url']}"
    elif s.get("starting"):
        state = f"starting, pid {s['starting_pid'] or '?'}"
    else:
        state = "not running"
    lines = [f"agent data: {s['data_dir']}  ({state})"]
    if not s["models"]:
        lines.append("no models installed")
    for name, m in s["models"].items():
        lines.append(f"model {name}: active {m['active'] or '-'}  installed {', '.join(m['installed']) or '-'}")
        a = m["last_attempt"]
        if a:
            ago = time.time() - a["at"]
            msg = f" — {a['message']}" if a.get("message") else ""
            lines.append(f"  last update attempt {ago:.0f}s ago: {a['version'] or '?'} {a['outcome']}{msg}")
        for v, r in m["refused"].items():
            lines.append(f"  refused {v}: {r.get('code')}: {r.get('message')}")
    o = s["outbox"]
    if o:
        lines.append(f"outbox: {o['depth']} waiting, {o['uploaded']} uploaded, dropped {o['dropped_full']} "
                     f"(full) + {o['dropped_age']} (too old) + {o['dropped_refused']} (refused by the cloud)")
    mix = s["route_mix"]
    if mix:
        share = f"{mix['cloud_share']:.1%}" if mix["cloud_share"] is not None else "-"
        lines.append(f"route mix: {mix['edge']} edge, {mix['cloud']} cloud, {mix['failed']} failed (cloud share {share})")
    return "\n".join(lines) + "\n"
