#!/usr/bin/env bash
# `omni bench serve` against a freshly started `omni serve` (the embedded default model), the
# server's LLM stage as its own process on DEVICE. On the lent GPU machine:
#   bash scripts/gpu_setup.sh && DEVICE=0 bash scripts/bench_serve.sh
# On a CPU machine (small numbers):
#   DEVICE=cpu PROMPTS=8 CONCURRENCY=4 bash scripts/bench_serve.sh
set -euo pipefail
DEVICE=${DEVICE:-0}
PORT=${PORT:-8013}
PROMPTS=${PROMPTS:-256}
CONCURRENCY=${CONCURRENCY:-32}
INPUT_WORDS=${INPUT_WORDS:-256}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-128}

omni serve --port "$PORT" --devices "llm=$DEVICE" --no-speech --log-level WARNING &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "omni serve exited before it was healthy" >&2; exit 1; }
  sleep 1
done
omni bench serve --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct \
  --num-prompts "$PROMPTS" --input-words "$INPUT_WORDS" --output-tokens "$OUTPUT_TOKENS" \
  --concurrency "$CONCURRENCY"
