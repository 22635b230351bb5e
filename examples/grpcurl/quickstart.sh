#!/usr/bin/env bash
# pigment with grpcurl (https://github.com/fullstorydev/grpcurl): JSON in protobuf's mapping, services found
# by gRPC reflection (or pass -import-path protos -proto pigment/v1/generation.proto ...).
#   TARGET=127.0.0.1:50051 PIGMENT_API_KEY=pgm_... USER_ID=curl-alice examples/grpcurl/quickstart.sh
set -euo pipefail
TARGET=${TARGET:-127.0.0.1:50051}
USER_ID=${USER_ID:-curl-alice}
AUTH=()
[[ -n "${PIGMENT_API_KEY:-}" ]] && AUTH=(-H "authorization: Bearer $PIGMENT_API_KEY")
g() { grpcurl -plaintext "${AUTH[@]}" -max-time 120 -d "$2" "$TARGET" "pigment.v1.$1"; }

g HistoryService/UpsertItems '{"items": [{"itemId": "'"$USER_ID"'-star", "caption": "a small blue star"}]}' >/dev/null
g HistoryService/LogInteractions '{"userId": "'"$USER_ID"'", "createUser": true,
  "interactions": [{"itemId": "'"$USER_ID"'-star", "kind": "like"}]}' >/dev/null
result=$(g GenerationService/GeneratePersonalized '{"requestId": "'"$USER_ID"'-first", "userId": "'"$USER_ID"'",
  "prompt": "a star", "numImages": 2, "numInferenceSteps": 2}')
first=$(grep -o '"generationId": "[^"]*"' <<<"$result" | head -1 | cut -d'"' -f4)
g GenerationService/GetGeneration '{"generationId": "'"$first"'", "delivery": "IMAGE_DELIVERY_NONE"}'
g GenerationService/LogFeedback '{"feedbackId": "'"$USER_ID"'-like", "userId": "'"$USER_ID"'",
  "generationId": "'"$first"'", "kind": "FEEDBACK_KIND_LIKE"}'
