"""``tandem agent {run,status}`` and ``tandem demo``. Cheap to import: the work happens in ``run``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def agent(parser: argparse.ArgumentParser) -> None:
    """Run the device agent (model updates, local API, store-and-forward) or show its status."""
    sub = parser.add_subparsers(dest="agent_command", metavar="ACTION", required=True)

    p = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    p.add_argument("--config", type=Path, default=None, help="YAML/TOML/JSON config file (env TANDEM_AGENT_* overrides it)")
    p.add_argument("--data", type=Path, default=None, help="data directory (overrides the config)")
    p.add_argument("--port", type=int, default=None, help="local API port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--cloud-url", default=None, help="the cloud tier (overrides the config)")
    p.set_defaults(run=_run)

    p = sub.add_parser("status", help="active versions, last update attempt, outbox depth, route mix")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", type=Path, default=None)
    g.add_argument("--data", type=Path, default=None, help="the agent's data directory")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(run=_status)


#: Written by ``tandem agent run`` before anything slow (imports, the store's recovery), so that
#: ``tandem agent status`` says "starting" from the first moment: the agent's own signs of life
#: (its lock, then agent.json) come a second or more later. Holds the pid; removed on exit.
STARTING_NAME = "agent.starting"
#: A marker older than this whose pid is alive belongs to a reused pid, not to a starting agent.
_STARTING_MAX_AGE_S = 300.0


def _run(args: argparse.Namespace) -> int:
    marker = _mark_starting(args.data) if args.data is not None else None
    try:
        import asyncio

        from .agent.config import load_config

        cfg = load_config(args.config, data_dir=args.data, port=args.port, cloud_url=args.cloud_url)
        if marker is None:
            marker = _mark_starting(cfg.data_dir)
        from .agent.daemon import run_agent

        asyncio.run(run_agent(cfg))
        return 0
    finally:
        if marker is not None:
            _unmark_starting(marker)


def _mark_starting(data_dir: Path) -> Path | None:
    """Write DATA/agent.starting with this pid; None if the data directory cannot be written (the
    agent then reports why itself)."""
    import os

    marker = Path(data_dir) / STARTING_NAME
    tmp = marker.with_name(f".{STARTING_NAME}.{os.getpid()}")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, marker)
    except OSError:
        return None
    return marker


def _unmark_starting(marker: Path) -> None:
    import contextlib
    import os

    # Only our own: a second agent refused on a busy data directory must not remove the first's.
    if _read_pid(marker) == os.getpid():
        with contextlib.suppress(OSError):
            marker.unlink()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _starting_pid(data_dir: Path) -> int | None:
    """The pid of an agent started on ``data_dir`` that has not taken its lock yet, else None."""
    import os
    import time

    marker = Path(data_dir) / STARTING_NAME
    pid = _read_pid(marker)
    if pid is None or pid <= 0:
        return None
    try:
        if time.time() - marker.stat().st_mtime > _STARTING_MAX_AGE_S:
            return None
        os.kill(pid, 0)
    except (OSError, ProcessLookupError):
        return None  # gone (killed before it could clean up), or not ours to signal
    return pid


#: How long after its start a ``tandem agent run`` process may not have written its marker yet.
_LAUNCH_WINDOW_S = 10.0


def _launching_agents(data_dir: Path) -> list[int]:
    """``tandem agent run`` processes started in the last few seconds that may be for ``data_dir``
    (Linux: from /proc; elsewhere none)."""
    import os

    mine = data_dir.resolve()
    found = []
    try:
        entries = os.listdir("/proc")
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # Field 22 (start time, in clock ticks since boot) counts from after the ")" that
                # ends the command name, which may itself hold spaces.
                started = int(f.read().rsplit(b")", 1)[1].split()[19]) / ticks
            if uptime - started > _LAUNCH_WINDOW_S:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        if not any(a.endswith("tandem") or a == "tandem.shared.cli" for a in argv):
            continue
        try:
            i = argv.index("agent")
        except ValueError:
            continue
        if argv[i + 1:i + 2] != ["run"]:
            continue
        data = argv[argv.index("--data") + 1] if "--data" in argv[:-1] else None
        if data is not None and Path(data).resolve() != mine:
            continue  # another data directory
        found.append(int(entry))
    return found


def _status(args: argparse.Namespace) -> int:
    import time

    from .agent.config import load_config
    from .agent.status import collect, format_status

    data = args.data if args.data is not None else load_config(args.config).data_dir
    s = collect(data)
    if not s["running"] and not s["starting"]:
        pid = _starting_pid(Path(data))
        if pid is None and _launching_agents(Path(data)):
            # `tandem agent run &` then `tandem agent status` start together: the agent may not
            # have reached the point where it writes its marker yet. Give it that moment (bounded).
            deadline = time.monotonic() + 3.0
            while pid is None and not (s["running"] or s["starting"]) and time.monotonic() < deadline:
                time.sleep(0.05)
                s = collect(data)
                pid = _starting_pid(Path(data))
        if pid is not None and not (s["running"] or s["starting"]):
            s.update(starting=True, starting_pid=pid)
    print(json.dumps(s, indent=2, default=str) if args.json else format_status(s), end="\n" if args.json else "")
    return 0


def demo(parser: argparse.ArgumentParser) -> None:
    """Run Tandem end to end on this machine: build, serve, agent, routed workload with an outage."""
    parser.add_argument("--work", type=Path, default=Path(".tandem/demo"), help="work directory (default .tandem/demo)")
    parser.add_argument("--quick", action="store_true", help="fewer inputs and a quick build (for tests)")
    parser.add_argument("--rebuild", action="store_true", help="build the bundle even if one exists")
    parser.add_argument("--cloud-latency-ms", type=float, default=20.0, help="latency added to the cloud link")

    def run(args: argparse.Namespace) -> int:
        from .demo import run_demo

        return run_demo(args.work, quick=args.quick, rebuild=args.rebuild, cloud_latency_ms=args.cloud_latency_ms)

    parser.set_defaults(run=run)
