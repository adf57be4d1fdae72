#!/usr/bin/env bash
# The 24 GiB offload mode (bench_step.py --mode capped) on a GPU machine (the `device` tool), several settings in
# one call, each in its own process (the cap is per process): full-size random Qwen-Image, 1024², rank 32, token
# on, real tokenizer where carried. One JSON per setting and a summary line each in $OUT.
#   OUT=/tmp/out CARRY=.gpu-dp VARIANTS="--prefetch-gib 0;--prefetch-gib 1;--offload-te fp8" bash bench/offload_gpu.sh
# A setting may start with environment assignments for its process only: "TORCHINDUCTOR_CPP_WRAPPER=1 --compile".
# Carries: $CARRY/whl/diffusers-*.whl and $CARRY/tok (the real tokenizer files).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-}"
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/out}
tmp=${TMPROOT:-/tmp}
carry=${CARRY:-.gpu-dp}
mkdir -p "$out" "$tmp/site" "$tmp/pkgs"
compgen -G "$carry/whl/diffusers-*.whl" >/dev/null && \
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$carry"/whl/diffusers-*.whl
ln -sfn "$repo" "$tmp/pkgs/qwen_zero_prior"   # the repository root is the package
[[ -d $carry/tok ]] && export QWEN_IMAGE_TOKENIZER=$PWD/$carry/tok
export PYTHONPATH=$tmp/site:$tmp/pkgs${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader || true
IFS=';' read -r -a variants <<<"${VARIANTS:---prefetch-gib 0;--prefetch-gib 1}"
i=0
for v in "${variants[@]}"; do
  i=$((i + 1))
  t0=$(date +%s)
  envs=() flags=()
  for t in $v; do
    if [[ $t =~ ^[A-Z_][A-Z0-9_]*= ]]; then envs+=("$t"); else flags+=("$t"); fi
  done
  env ${envs[@]+"${envs[@]}"} timeout "${RUN_TIMEOUT:-300}" python3 -m bench.bench_step --size full --mode capped \
    --capped-gib "${CAP_GIB:-24}" --warmup "${WARMUP:-3}" --iters "${ITERS:-5}" ${flags[@]+"${flags[@]}"} \
    --out "$out/offload-$i.json" >"$out/offload-$i.log" 2>&1
  rc=$?
  row=$(grep -h '^{"name"' "$out/offload-$i.log" | tail -1)
  echo "[$i] ($v) exit $rc after $(( $(date +%s) - t0 )) s: ${row:-no row; log tail: $(tail -3 "$out/offload-$i.log" | tr '\n' ' ')}"
done
