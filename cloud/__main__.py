"""``python -m tandem.cloud ...`` is ``tandem serve ...``."""

from __future__ import annotations

import sys

from tandem.shared.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
