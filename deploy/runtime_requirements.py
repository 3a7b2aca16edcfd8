"""Print the runtime requirements of pyproject.toml for the cloud image, one per line, minus onnxruntime.

The image installs ``onnxruntime-gpu`` instead: onnxruntime and onnxruntime-gpu install the same
``onnxruntime`` module, and with both present whichever was installed last silently wins.

    python deploy/runtime_requirements.py [pyproject.toml] > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REPLACED = "onnxruntime"


def requirements(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() != REPLACED]


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
