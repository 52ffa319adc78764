#!/usr/bin/env bash
# The serving benchmarks of docs/benchmarks.md: the load of `omni bench serve` against a freshly
# started `omni serve` (benchmarks/serving.py), its stages on DEVICE (a GPU index, or cpu):
#   1. the embedded default model, text, beside the offline engine on the same requests, once
#      for each CONCURRENCY;
#   2. a tiny random Qwen2.5-VL (the tests' fixture) with its vision stage as its own process:
#      images, then PDF pages, then the images again (served from the caches).
# On the lent GPU machine:
#   bash scripts/gpu_setup.sh && DEVICE=0 bash scripts/bench_serve.sh
# On a CPU machine (small numbers):
#   DEVICE=cpu PROMPTS=8 CONCURRENCY=4 bash scripts/bench_serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-0}
PROMPTS=${PROMPTS:-256}
CONCURRENCY=${CONCURRENCY:-32}

for concurrency in $CONCURRENCY; do
  python3 benchmarks/serving.py --devices "llm=$DEVICE" --offline --num-prompts "$PROMPTS" \
    --concurrency "$concurrency" --input-words 256 --output-tokens 128
done

vl=$(mktemp -d)
trap 'rm -rf "$vl"' EXIT
(cd tests && python3 -c 'import sys; from fixtures_vl import make_tiny_qwen2_5_vl as make; make(sys.argv[1])' "$vl")
python3 benchmarks/serving.py "$vl" --served-model-name tiny-vl \
  --devices "llm=$DEVICE,vision=$DEVICE" --runs image,pdf,image --num-prompts "$PROMPTS" \
  --concurrency "${CONCURRENCY%% *}" --input-words 32 --output-tokens 32 --image-size 224x224
