#!/usr/bin/env bash
# The cloud tier without a container: `tandem serve` on this machine.
#
#   examples/cloud/run_local.sh [REPOSITORY] [PORT] [more tandem serve flags...]
#
# REPOSITORY defaults to artifacts/repository, PORT to 8000; TANDEM_KEYS names the key directory
# (default artifacts/keys, where `tandem build` signs by default). The server trusts
# TANDEM_KEYS/tandem.pub only, so:
#   - with no key pair and no bundle, it makes a key pair and builds the digits bundle signed with it;
#   - with bundles but no key pair, it stops: a fresh key could not verify them;
#   - every bundle must verify with that key before the server starts (else it names the bundle).
# Listens on 127.0.0.1 only; put a reverse proxy (TLS, auth) in front, or use the container
# (run_container.sh), to expose it.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
repo="${1:-${TANDEM_REPOSITORY:-$root/artifacts/repository}}"
port="${2:-${PORT:-8000}}"
keys="${TANDEM_KEYS:-$root/artifacts/keys}"

bundles() { ls -d "$repo"/*/*/ 2>/dev/null | while read -r b; do [ -f "$b/manifest.json" ] && echo "${b%/}"; done; }

if [ ! -f "$keys/tandem.pub" ]; then
    if [ -n "$(bundles)" ]; then
        echo "error: $repo holds bundles but $keys has no tandem.pub; set TANDEM_KEYS to the directory" \
             "of the key pair that signed them (tandem build --key DIR/tandem.key)" >&2
        exit 2
    fi
    tandem keygen --out "$keys"
fi
if [ -z "$(bundles)" ]; then
    echo "no bundle in $repo: building examples/digits signed with $keys/tandem.key${BUILD_FLAGS:+ ($BUILD_FLAGS)}"
    tandem build "$root/examples/digits" --repository "$repo" --key "$keys/tandem.key" --no-progress ${BUILD_FLAGS:-}
fi
# The server refuses a bundle its key did not sign; say so here, naming the bundle, not in its log.
while read -r bundle; do
    if ! why="$(tandem bundle verify --key "$keys/tandem.pub" "$bundle" 2>&1)"; then
        echo "error: $bundle does not verify with $keys/tandem.pub: $why" >&2
        exit 1
    fi
done < <(bundles)
echo "serving $repo on http://127.0.0.1:$port (ready: GET /v2/health/ready; metrics: GET /metrics)"
exec tandem serve --repository "$repo" --host 127.0.0.1 --port "$port" --trusted-key "$keys/tandem.pub" \
    --instances "${INSTANCES:-1}" "${@:3}"
