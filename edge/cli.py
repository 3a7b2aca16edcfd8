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


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from .agent.config import load_config
    from .agent.daemon import run_agent

    cfg = load_config(args.config, data_dir=args.data, port=args.port, cloud_url=args.cloud_url)
    asyncio.run(run_agent(cfg))
    return 0


def _status(args: argparse.Namespace) -> int:
    from .agent.config import load_config
    from .agent.status import collect, format_status

    data = args.data if args.data is not None else load_config(args.config).data_dir
    s = collect(data)
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
