#!/usr/bin/env bash
# pigment from a shell with the Python client's command line (pip install ./clients/python). grpcurl does the
# same with raw JSON (examples/grpcurl/quickstart.sh) where it is installed.
#   TARGET=127.0.0.1:50051 PIGMENT_API_KEY=pgm_... USER_ID=sh-alice examples/shell/quickstart.sh
set -euo pipefail
TARGET=${TARGET:-127.0.0.1:50051}
USER_ID=${USER_ID:-sh-alice}
PY=${PYTHON:-python3}
pc() { "$PY" -m pigment_client --target "$TARGET" "$@"; }

pc item "${ITEM_ID:-sh-star}" "a small blue star" --tenant "${TENANT:-}" >/dev/null
pc interactions "$USER_ID" "${ITEM_ID:-sh-star}:like" --tenant "${TENANT:-}" >/dev/null
result=$(pc generate "$USER_ID" "a star" --images 2 --steps 2 --request-id "$USER_ID-first")
ids=$("$PY" -c 'import json,sys; print(" ".join(i["generationId"] for i in json.loads(sys.stdin.read())["images"]))' <<<"$result")
read -r first second <<<"$ids"
mkdir -p quickstart-output
pc get-generation "$first" --png "quickstart-output/$first.png" >/dev/null
pc feedback "$USER_ID" "$first" pick --other "$second" --feedback-id "$USER_ID-pick"
echo "{\"generation_ids\": [\"$first\", \"$second\"], \"png_bytes\": $(wc -c <"quickstart-output/$first.png")}"
