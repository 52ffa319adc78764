#!/usr/bin/env bash
# Dev-only, on the lent GPU after scripts/gpu_vllm_setup.sh: a workload of
# benchmarks/serve_vs_vllm.py (WORKLOAD, default a) served by omni with the profiling hook, in
# the modes and placements named (default: all three below); summaries into $OUT.
# Usage: [WORKLOAD=c] bash benchmarks/profiling/lease.sh [timing-coloc,timing-split,trace]
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
runs=${1:-timing-coloc,timing-split,trace}
workload=${WORKLOAD:-a}
common="--api-server-count 4 --asr-replicas 0 --ocr-replicas 0"
coloc="$common --colocate-encoders --devices llm=0"
for run in ${runs//,/ }; do
  case $run in
    timing-coloc) mode=timing; args=$coloc ;;
    timing-split) mode=timing; args=$common ;;
    trace|trace-coloc) mode=trace; args=$coloc ;;
    trace-split) mode=trace; args=$common ;;
    *) echo "unknown run $run"; continue ;;
  esac
  rm -rf "/tmp/prof-$run"
  PYTHONPATH=$PWD/benchmarks/profiling OMNI_PROFILE_OUT=/tmp/prof-$run OMNI_PROFILE_MODE=$mode \
    python3 benchmarks/serve_vs_vllm.py --workloads "$workload" --servers omni --omni-args "$args" \
    --out-dir "/tmp/out-$run" --work-dir "/tmp/work-$run" >"/tmp/$run.log" 2>&1
  { grep '^| omni |' "/tmp/out-$run/results.md"; ls /tmp/prof-$run; } >"$OUT/$run.txt" 2>&1
  if [ "$mode" = timing ]; then
    python3 benchmarks/profile_serving.py "/tmp/prof-$run/steps.json" >>"$OUT/$run.txt" 2>&1
    cp "/tmp/prof-$run/steps.json" "$OUT/steps-$run.json"
  else
    python3 benchmarks/profile_serving.py "/tmp/prof-$run/trace.json" \
      --save-reduced "$OUT/reduced-$run.json.gz" >>"$OUT/$run.txt" 2>&1
  fi
  cat "$OUT/$run.txt"
done
