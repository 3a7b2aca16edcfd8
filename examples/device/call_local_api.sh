#!/usr/bin/env bash
# A non-Python client of the agent's local API: plain curl.
#
#   examples/device/call_local_api.sh [AGENT_URL] [SOCKET]
#
# 1. the Open Inference Protocol v2 JSON form over HTTP on 127.0.0.1 (request.json: the first digit of
#    scikit-learn's digits, a "0"); the budget rides in "parameters";
# 2. the native msgpack protocol over the agent's Unix socket (request.msgpack: the same input, made
#    committed alongside; see README.md for how it was made), the budget in headers;
# 3. a user correction sent as feedback (store-and-forward to the cloud).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
url="${1:-${AGENT_URL:-http://127.0.0.1:8765}}"
sock="${2:-${AGENT_SOCKET:-$here/data/agent.sock}}"
model="${MODEL:-digits}"

echo "== v2 JSON over HTTP: POST $url/v2/models/$model/infer"
curl -sS --fail-with-body -D "$here/.headers" -H 'Content-Type: application/json' \
     --data-binary @"$here/request.json" "$url/v2/models/$model/infer"
echo
grep -i '^x-tandem-\(tier\|route-reason\|model-version\)' "$here/.headers" || true

echo "== native msgpack over the Unix socket $sock"
curl -sS --fail-with-body --unix-socket "$sock" -o "$here/.response.msgpack" -D "$here/.headers" \
     -H 'Content-Type: application/msgpack' -H 'X-Tandem-Policy: edge-only' -H 'X-Tandem-Latency-Ms: 50' \
     --data-binary @"$here/request.msgpack" "http://agent/v1/models/$model/infer"
echo "$(wc -c < "$here/.response.msgpack") bytes of msgpack back"
grep -i '^x-tandem-\(tier\|route-reason\|model-version\)' "$here/.headers" || true

echo "== feedback: POST $url/v1/feedback"
curl -sS --fail-with-body -H 'Content-Type: application/json' \
     --data '{"records": [{"kind": "feedback", "model": "'"$model"'", "request_id": "curl-1", "label": 0}]}' \
     "$url/v1/feedback"
echo
rm -f "$here/.headers" "$here/.response.msgpack"
