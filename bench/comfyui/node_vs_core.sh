#!/usr/bin/env bash
# One device call: the training node through a real ComfyUI (gpu_node_bench.sh, $RUNS) and then, on the same GPU in
# the same call, the core trainer's step under the same per-process memory cap ($CORE_CAP_GIB; bench_step.py with
# $CORE_ARGS, default: compile + gradient checkpointing; the core's best under 78 GiB is
# CORE_ARGS='--mode variants --isolate --attention-backend _native_cudnn
#            --variant "compile=1 compile_mode=reduce-overhead fp8_matmul=1 memory_cap_gib=78"'), so the two compare.
#   RUNS="comfyui-0.33.0:78" CORE_CAP_GIB=78 bash bench/comfyui/node_vs_core.sh
#   RUNS="comfyui-0.33.0:24" CORE_CAP_GIB=24 CORE_ARGS="--mode capped --capped-gib 24" bash bench/comfyui/node_vs_core.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-/tmp/out}
bash "$here/gpu_node_bench.sh"
mkdir -p /tmp/pkgs && ln -sfn "$repo" /tmp/pkgs/qwen_zero_prior   # the repository root is the package
[[ -f /tmp/zp-tok/vocab.json ]] && export QWEN_IMAGE_TOKENIZER=${QWEN_IMAGE_TOKENIZER:-/tmp/zp-tok}
echo "core bench tokenizer: ${QWEN_IMAGE_TOKENIZER:-none (a byte-level stand-in: longer captions)}"
# --mode capped builds the full-size model first and sets its own cap (--capped-gib) afterwards: no cap from the start
cap_arg="--memory-cap-gib ${CORE_CAP_GIB:-78}"; [[ ${CORE_ARGS:-} == *"--mode capped"* ]] && cap_arg=""
eval "core_args=(${CORE_ARGS:---mode variants --compile --variant gradient_checkpointing=1})"  # keeps quoted variants
t0=$(date +%s)
PYTHONPATH=/tmp/site:/tmp/pkgs${PYTHONPATH:+:$PYTHONPATH} timeout "${CORE_TIMEOUT:-400}" python3 -m bench.bench_step \
  --size full $cap_arg --warmup 2 --iters "${CORE_ITERS:-5}" \
  "${core_args[@]}" --out "$out/core-cap${CORE_CAP_GIB:-78}.json" \
  2>&1 | grep -E '^\{|Error|error' | tail -8
echo "== core bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
