#!/usr/bin/env bash
# On the lent GPU machine (no registry): install the carried wheelhouse, then omni itself
# without touching the machine's torch/transformers. Build the wheelhouse here first with
#   EXTRA="gguf setuptools wheel" bash ../shared/gpu/wheelhouse.sh .wheelhouse
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --find-links .wheelhouse -r .wheelhouse/requirements.txt
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
