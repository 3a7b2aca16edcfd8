#!/usr/bin/env python3
"""Container health check for ``tandem serve``: exit 0 iff ``GET http://127.0.0.1:$TANDEM_PORT<path>``
answers 200.

Installed in the image as ``tandem-healthcheck``. When API keys are configured (``TANDEM_API_KEYS``,
a JSON list or one key), every route but ``/v2/health/live`` needs ``Authorization: Bearer``, which
an ``httpGet`` probe cannot take from a Secret; this script sends the first key. Standard library
only: it runs every few seconds and must start fast.

    tandem-healthcheck [/v2/health/ready]
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def _first_key(raw: str) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        keys = json.loads(raw)
    except json.JSONDecodeError:
        return raw.split(",")[0].strip() or None
    if isinstance(keys, list):
        return str(keys[0]) if keys else None
    return str(keys)


def check(path: str = "/v2/health/ready") -> int:
    port = os.environ.get("TANDEM_PORT", "8000")
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    key = _first_key(os.environ.get("TANDEM_API_KEYS", ""))
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(check(sys.argv[1] if len(sys.argv) > 1 else "/v2/health/ready"))
