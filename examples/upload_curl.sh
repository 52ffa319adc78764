#!/usr/bin/env bash
# Post files to a running `omni serve` with curl: no base64, no JSON. The server types each
# file by its contents (image, audio or PDF) and answers as /v1/chat/completions does.
#
#   omni serve /path/to/Qwen2.5-VL-3B-Instruct
#   bash examples/upload_curl.sh photo.jpg report.pdf
#
# Images and PDFs need a vision-language model (Qwen2-VL / Qwen2.5-VL), audio clips
# (WAV, FLAC, OGG, MP3) a Qwen2-Audio model. Set OMNI_URL for another server and
# OMNI_API_KEY if it was started with --api-key.
set -euo pipefail

url="${OMNI_URL:-http://127.0.0.1:8000}"
prompt="${PROMPT:-What is in these files?}"
if [ "$#" -eq 0 ]; then
  echo "usage: $0 FILE [FILE ...]   (PROMPT=... to ask something else)" >&2
  exit 2
fi

files=()
for path in "$@"; do
  files+=(-F "file=@${path}")
done
auth=()
if [ -n "${OMNI_API_KEY:-}" ]; then
  auth=(-H "Authorization: Bearer ${OMNI_API_KEY}")
fi

# One JSON answer; add -F stream=true (and -N) for server-sent events as they are generated.
curl -sS ${auth[@]+"${auth[@]}"} -F "prompt=${prompt}" "${files[@]}" -F max_tokens=256 -F temperature=0 \
  "${url}/v1/uploads/chat"
echo
