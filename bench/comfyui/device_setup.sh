#!/usr/bin/env bash
# On a GPU machine without internet: install what `pack.sh` carried (wheels into /tmp/site, comfy_kitchen's
# Python part, ComfyUI trees into /tmp/comfyui-<version>). Idempotent. Afterwards:
#   export PYTHONPATH=/tmp/site
#   python bench/comfyui/make_weights.py dit --dtype fp8_e4m3fn /tmp/zp-models/qwen_image_fp8_e4m3fn.safetensors
#   python bench/comfyui/run_node.py --comfyui /tmp/comfyui-0.33 --models /tmp/zp-models ... --out result.json
set -euo pipefail
carry=${1:-.gpu}
site=/tmp/site
mkdir -p "$site"
if [[ -d $carry/whl ]] && compgen -G "$carry/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$carry"/whl/*.whl
fi
[[ -f $carry/kitchen.tgz ]] && tar xzf "$carry/kitchen.tgz" -C "$site"
for t in "$carry"/comfyui-*.tgz; do
  [[ -f $t ]] || continue
  dest=/tmp/$(basename "$t" .tgz)
  [[ -f $dest/main.py ]] || { mkdir -p "$dest" && tar xzf "$t" -C "$dest"; }
  echo "ComfyUI $(sed -n 's/__version__ = "\(.*\)"/\1/p' "$dest/comfyui_version.py") at $dest"
done
if [[ -f $carry/tok.tgz ]]; then  # the real tokenizer (pack.sh) for the core's bench: QWEN_IMAGE_TOKENIZER
  mkdir -p /tmp/zp-tok && tar xzf "$carry/tok.tgz" -C /tmp/zp-tok
fi
echo "site: $(ls "$site" | wc -l) entries in $site"
