"""The ``tandem`` command: a dispatcher over subcommands that each tier registers.

Subcommands come from the ``tandem.commands`` entry-point group (see pyproject.toml), so this module
never imports a tier. Each entry point is a ``configure(parser)`` function that adds its arguments
and sets ``parser.set_defaults(run=callable)``, where ``run(args) -> int``. Command modules must be
cheap to import (no torch, no onnxruntime at module level) so ``tandem --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from importlib.metadata import entry_points

from . import __version__
from .errors import TandemError

GROUP = "tandem.commands"
DISTRIBUTION = "tandem"

#: The extras (pyproject.toml's optional-dependencies) a command cannot run without. Checked before
#: the command starts, so a missing extra gives one message instead of a traceback minutes into a build.
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "build": ("build",),
    "demo": ("build", "cloud"),
    "serve": ("cloud",),
    "worker": ("cloud",),
}

#: Import names that differ from their distribution's normalised name.
_DIST_OF_MODULE = {"sklearn": "scikit-learn"}


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
        extra = extra_of_module(error.name or "")
        print(needs_extras_message(name, [extra]) if extra else f"tandem {name} is unavailable here: {error}", file=sys.stderr)
        return 2

    return run


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extras_requirements() -> dict[str, list[str]]:
    """{extra: [distribution names]} from the installed tandem's metadata (empty when not installed)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for req in requires:
        spec, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.strip())
        if not extra or not name:
            continue
        if "win32" in marker and sys.platform == "win32":
            continue  # e.g. uvloop, which the server does without on Windows
        out.setdefault(extra.group(1), []).append(_normalise(name.group(0)))
    return out


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing_extras(command: str) -> list[str]:
    """The extras ``command`` needs (COMMAND_EXTRAS) of which some distribution is not installed."""
    table = extras_requirements()
    return [e for e in COMMAND_EXTRAS.get(command, ()) if not all(_installed(d) for d in table.get(e, []))]


def extra_of_module(module: str) -> str | None:
    """The extra whose distribution provides the top-level module ``module``, if any."""
    top = module.split(".")[0]
    dist = _normalise(_DIST_OF_MODULE.get(top, top))
    for extra, dists in extras_requirements().items():
        if dist in dists:
            return extra
    return None


def needs_extras_message(command: str, extras: Sequence[str]) -> str:
    names = " and ".join(extras)
    noun = "extra" if len(extras) == 1 else "extras"
    return f"tandem {command} needs the {names} {noun}: pip install 'tandem[{','.join(extras)}]'"


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
    missing = missing_extras(args.command)
    if missing:
        print(needs_extras_message(args.command, missing), file=sys.stderr)
        return 2
    try:
        return int(run(args) or 0)
    except ModuleNotFoundError as e:
        # An optional dependency imported deep inside a command: name the extra that brings it.
        extra = extra_of_module(e.name or "")
        if extra is None:
            raise
        print(needs_extras_message(args.command, [extra]), file=sys.stderr)
        return 2
    except TandemError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
