"""Run the bench's servers or measurements from another checkout of Tandem (an older commit, say).

    git worktree add --detach /tmp/old <commit>
    env = checkout_env(Path("/tmp/old"), tmp)   # then subprocess.Popen(..., env=env)

The environment's ``PYTHONPATH`` starts with a directory whose ``tandem`` package maps to that
checkout's ``shared/``, ``cloud/``, ``edge/`` and ``quantize/``, as the editable install maps this
one's: ``import tandem.cloud`` (and ``python -m tandem.cloud...``) then loads the other checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["checkout_env"]

_PACKAGES = ("shared", "cloud", "edge", "quantize")


def checkout_env(checkout: Path, tmp: Path) -> dict[str, str]:
    """``os.environ`` with ``PYTHONPATH`` led by ``tmp``/tandem -> ``checkout``'s packages."""
    checkout = checkout.resolve()
    if not (checkout / "cloud" / "front.py").is_file():
        raise SystemExit(f"{checkout} is not a Tandem checkout (no cloud/front.py)")
    package = tmp / "tandem"
    package.mkdir(parents=True, exist_ok=True)
    for name in _PACKAGES:
        link = package / name
        if not link.is_symlink():
            link.symlink_to(checkout / name)
    path = os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}
