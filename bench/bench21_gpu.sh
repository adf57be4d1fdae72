#!/usr/bin/env bash
# Qwen-Image 2.1 at full size on one GPU (the `device` tool), random weights, 1024², rank 32, token on (issue #17).
# PART=uncapped: (a) diffusers + peft (eager, without / with checkpointing) and (b) this project's step, each variant
# in its own process (an OOM or crash is a row), one JSON. PART=capped: the memory plan for a 24 GiB card under a
# hard 24 GiB cap. Carries .gpu/whl/diffusers-*.whl (0.42, with QwenImage21*) and optionally .gpu/tok (the
# Qwen-Image tokenizer; without it a byte-level one stands in and the text is longer). JSON and logs in $OUT.
#   PART=uncapped OUT=$OUT bash bench/bench21_gpu.sh      # ~6-8 min
#   PART=capped OUT=$OUT bash bench/bench21_gpu.sh        # ~2-3 min
set -uo pipefail
repo=$PWD
out=${OUT:-/tmp/out}; mkdir -p "$out" /tmp/pkgs /tmp/site
carry=${CARRY:-.gpu}
compgen -G "$carry/whl/diffusers-*.whl" >/dev/null && \
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/whl/diffusers-*.whl
ln -sfn "$repo" /tmp/pkgs/qwen_zero_prior   # the repository root is the package
[[ -d $carry/tok ]] && export QWEN_IMAGE_TOKENIZER=$PWD/$carry/tok
export PYTHONPATH=/tmp/site:/tmp/pkgs${PYTHONPATH:+:$PYTHONPATH}
common=(--family qwen-image-2.1 --size full --res 1024 --rank 32 --warmup "${WARMUP:-2}" --iters "${ITERS:-5}")
case ${PART:-uncapped} in
  uncapped)
    python3 -m bench.bench_step "${common[@]}" --mode variants --isolate \
      --variant "baseline=1 gradient_checkpointing=0" --variant "baseline=1 gradient_checkpointing=1" \
      --variant "compile=1" --variant "compile=1 compile_mode=reduce-overhead" \
      --variant "fp8_matmul=1 compile=1 compile_mode=reduce-overhead" ${EXTRA:-} \
      --out "$out/bench21-uncapped.json" 2>&1 | tee "$out/bench21-uncapped.log" ;;
  capped)
    python3 -m bench.bench_step "${common[@]}" --mode capped --capped-gib "${CAP_GIB:-24}" \
      --out "$out/bench21-capped.json" 2>&1 | tee "$out/bench21-capped.log" ;;
  *) echo "PART must be uncapped or capped, got ${PART}" >&2; exit 2 ;;
esac
