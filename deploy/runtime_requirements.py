"""Print what the cloud image installs from pyproject.toml, one requirement per line: the base
dependencies plus the ``cloud`` extra, optionally without some distributions.

The GPU image leaves out ``onnxruntime`` and installs ``onnxruntime-gpu`` instead: both install the
same ``onnxruntime`` module, and with both present whichever was installed last silently wins.

    python deploy/runtime_requirements.py pyproject.toml [--without onnxruntime] > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

EXTRA = "cloud"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def requirements(pyproject: Path, without: tuple[str, ...] = ()) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = [*project["dependencies"], *project["optional-dependencies"][EXTRA]]
    return [d for d in deps if _name(d) not in {w.lower() for w in without}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path, nargs="?", default=Path("pyproject.toml"))
    parser.add_argument("--without", action="append", default=[], metavar="DIST", help="leave this distribution out")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, tuple(args.without))))
