#!/usr/bin/env bash
# One device call (the `device` tool; see docs/benchmarks.md "ComfyUI training node"): set up what pack.sh carried,
# write full-size random-weight files in ComfyUI's layouts (once per machine), then run the training node through
# /prompt for each "comfyui-<version>:<cap GiB>[:<one extra ComfyUI flag>[:<Train node inputs>[:<NAME=VALUE,...>]]]"
# in $RUNS (cap 0 = uncapped; card<N> = a card with N GiB free, emulated by a process holding the rest: run_node.py
# --card-gib), e.g. RUNS="comfyui-0.33.0:78 comfyui-0.33.0:0 comfyui-0.3.64:78::compile=1
# comfyui-0.33.0:78::fp8_matmul=1:QWEN_ZERO_PRIOR_EXACT_TEXT=1 comfyui-0.33.0:24".
# JSON rows and each run's ComfyUI log in $OUT. PROFILE_STEPS=2: the node's kernel table of 2 steps in each JSON;
# TRACE=1 with it: those steps' Chrome trace too, and bench/trace_gaps.py's report of it (idle gaps; copies beside
# kernels) in $OUT/<run>.gaps.txt (the trace itself is kept only with TRACE=keep: it is tens of MB).
set -uo pipefail
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/device_setup.sh" "${CARRY:-.gpu}"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
M=${MODELS:-/tmp/zp-models}
mkdir -p "$M" "${OUT:-/tmp/out}"
DIT=${DIT:-qwen_image_fp8_e4m3fn.safetensors}
TE=${TE:-qwen_2.5_vl_7b_fp8_scaled.safetensors}
VAE=${VAE:-qwen_image_vae.safetensors}
first_tree=$(ls -d /tmp/comfyui-* | sort -V | tail -1)
t0=$(date +%s)
[[ -f $M/$DIT ]] || python3 "$here/make_weights.py" dit --dtype "${DIT_DTYPE:-fp8_e4m3fn}" "$M/$DIT" &
[[ -f $M/$TE ]] || python3 "$here/make_weights.py" te --dtype "${TE_DTYPE:-fp8_scaled}" "$M/$TE" &
[[ -f $M/$VAE ]] || (cd "$first_tree" && python3 "$here/make_weights.py" vae "$M/$VAE") &
wait
echo "weights ready in $(( $(date +%s) - t0 )) s: $(du -sh "$M" | cut -f1)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for run in ${RUNS:-$(basename "$first_tree"):78}; do
  # comfyui-<version>:<cap>[:<one extra ComfyUI flag>[:<Train node inputs, e.g. fp8_matmul=1>]]
  IFS=: read -r v cap extra inputs env <<<"$run"
  env_args=(); IFS=, read -ra envs <<<"$env"; for e in "${envs[@]}"; do env_args+=("--env=$e"); done
  mem_args=(--cap-gib "$cap"); [[ $cap == card* ]] && mem_args=(--card-gib "${cap#card}")
  name="node-$v-cap$cap${extra:+$extra}${inputs:+-${inputs//[=,]/-}}${env:+-${env//[=,_]/-}}"
  trace="${OUT:-/tmp/out}/$name.trace.json.gz"
  [[ -n ${TRACE:-} && -n ${PROFILE_STEPS:-} ]] && env_args+=("--env=QWEN_ZERO_PRIOR_PROFILE_TRACE=$trace")
  timeout "${RUN_TIMEOUT:-420}" python3 "$here/run_node.py" --comfyui "/tmp/$v" --models "$M" --dit "$DIT" --te "$TE" \
    --vae "$VAE" "${mem_args[@]}" --steps "${STEPS:-10}" --sample-steps "${SAMPLE_STEPS:-4}" \
    --timeout "${PROMPT_TIMEOUT:-360}" ${extra:+--extra-args=$extra} ${inputs:+"--node-inputs=$inputs"} \
    ${PROFILE_STEPS:+--profile-steps "$PROFILE_STEPS"} "${env_args[@]}" \
    --out "${OUT:-/tmp/out}/$name.json"
  echo "== $v cap $cap $extra $inputs $env: exit $? after $(( $(date +%s) - t0 )) s"
  if [[ -f $trace ]]; then
    (cd "$here/../.." && python3 -m bench.trace_gaps "$trace") > "${OUT:-/tmp/out}/$name.gaps.txt" 2>&1
    head -5 "${OUT:-/tmp/out}/$name.gaps.txt"
    [[ ${TRACE:-} == keep ]] || rm -f "$trace"
  fi
done
