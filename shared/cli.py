"""The ``tandem`` command: a dispatcher over subcommands that each tier registers.

Subcommands come from the ``tandem.commands`` entry-point group (see pyproject.toml), so this module
never imports a tier. Each entry point is a ``configure(parser)`` function that adds its arguments
and sets ``parser.set_defaults(run=callable)``, where ``run(args) -> int``. Command modules must be
cheap to import (no torch, no onnxruntime at module level) so ``tandem --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from . import __version__
from .errors import TandemError

GROUP = "tandem.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="Hybrid edge-and-cloud ML inference: build, serve, route."
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            configure = ep.load()
        except ImportError as e:
            p = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            p.set_defaults(run=_unavailable(ep.name, e))
            continue
        doc = (configure.__doc__ or "").strip().splitlines()
        p = sub.add_parser(ep.name, help=doc[0] if doc else None, description=configure.__doc__)
        configure(p)
    return parser


def _unavailable(name: str, error: ImportError):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        hint = " (building needs the build extra: pip install 'tandem[build]')" if name == "build" else ""
        print(f"tandem {name} is unavailable here: {error}{hint}", file=sys.stderr)
        return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args) or 0)
    except TandemError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
