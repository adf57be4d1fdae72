#!/usr/bin/env bash
# Here (with internet to PyPI): gather what a GPU machine without internet needs to run a real ComfyUI with this
# pack, into .gpu/ (keep it out of git: echo /.gpu/ >> .git/info/exclude), at most ~64 MiB:
#   bench/comfyui/pack.sh ~/ComfyUI-0.33 [~/ComfyUI ...]      # your ComfyUI work trees (any versions)
# Wheels are for the device's Python 3.12 (ComfyUI >= 0.33's requirements beyond the device image, plus diffusers);
# comfy_kitchen travels without its compiled kernels (its triton/eager backends run; ComfyUI >= 0.33 imports it at
# start); the frontend is not needed headless (run_node.py serves a stub).
set -euo pipefail
out=${OUT_DIR:-.gpu}
mkdir -p "$out/whl"
pip_dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "${@:2}"
}
pip_dl "$out/whl" diffusers==0.42.1 torchsde trampoline alembic Mako SQLAlchemy greenlet comfy-aimdo==0.4.13 \
  "simpleeval>=1.0.0" blake3 "pydantic~=2.0" pydantic-core annotated-types typing-inspection "pydantic-settings~=2.0" \
  python-dotenv "av>=16.0.0"
tmp=$(mktemp -d)
pip_dl "$tmp" comfy-kitchen==0.2.31
(cd "$tmp" && python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('comfy_kitchen-*.whl')[0]).extractall('x')" \
  && find x -name '*.so' -delete && tar czf kitchen.tgz -C x .)
mv "$tmp/kitchen.tgz" "$out/kitchen.tgz"
rm -rf "$tmp"
for tree in "$@"; do
  v=$(sed -n 's/__version__ = "\(.*\)"/\1/p' "$tree/comfyui_version.py")
  tar czf "$out/comfyui-$v.tgz" -C "$tree" --exclude=.zp-overlay --exclude='./tests*' --exclude=./.github \
    --exclude=./blueprints --exclude=./.ci --exclude=__pycache__ --exclude=.git .
done
# the real Qwen-Image tokenizer for the core's bench in the same call (node_vs_core.sh; ~1.4 MB compressed)
tok=${TOKENIZER_DIR:-$(dirname "$0")/../../../shared/tokenizers/qwen-image}
[[ -d $tok ]] && tar czf "$out/tok.tgz" -C "$tok" .
du -sh "$out"/* | sort -h
