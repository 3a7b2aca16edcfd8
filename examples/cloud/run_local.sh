#!/usr/bin/env bash
# The cloud tier without a container: `tandem serve` on this machine.
#
#   examples/cloud/run_local.sh [REPOSITORY] [PORT]
#
# Builds the digits bundle into REPOSITORY first if it holds no bundle. Listens on 127.0.0.1 only;
# put a reverse proxy (TLS, auth) in front, or use the container (run_container.sh), to expose it.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
repo="${1:-${TANDEM_REPOSITORY:-$root/artifacts/repository}}"
port="${2:-${PORT:-8000}}"
keys="${TANDEM_KEYS:-$root/artifacts/keys}"

if [ ! -f "$keys/tandem.pub" ]; then
    tandem keygen --out "$keys"
fi
if ! ls "$repo"/*/*/manifest.json >/dev/null 2>&1; then
    echo "no bundle in $repo: building examples/digits${BUILD_FLAGS:+ ($BUILD_FLAGS)}"
    tandem build "$root/examples/digits" --repository "$repo" --key "$keys/tandem.key" --no-progress ${BUILD_FLAGS:-}
fi
echo "serving $repo on http://127.0.0.1:$port (ready: GET /v2/health/ready; metrics: GET /metrics)"
exec tandem serve --repository "$repo" --host 127.0.0.1 --port "$port" --trusted-key "$keys/tandem.pub" \
    --instances "${INSTANCES:-1}" "${@:3}"
