#!/usr/bin/env bash
# The cloud tier in its container (deploy/Dockerfile), as a platform team runs it.
#
#   examples/cloud/run_container.sh [REPOSITORY] [KEYS_DIR]
#
# Builds the image from the repository root, then runs it with the model repository mounted
# read-only and the publisher's public key as the only trusted key. The port is published on
# 127.0.0.1 only; drop the "127.0.0.1:" to expose it. Add --gpus all for CUDA.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
repo="$(cd "${1:-$root/artifacts/repository}" && pwd)"
keys="$(cd "${2:-$root/artifacts/keys}" && pwd)"
image="${IMAGE:-tandem-cloud:dev}"

docker build -f "$root/deploy/Dockerfile" -t "$image" "$root"
exec docker run --rm -p "127.0.0.1:${PORT:-8000}:8000" ${GPUS:+--gpus "$GPUS"} \
    -v "$repo:/models:ro" -v "$keys/tandem.pub:/etc/tandem/keys/publisher.pem:ro" \
    "$image" --trusted-key /etc/tandem/keys/publisher.pem "$@"
