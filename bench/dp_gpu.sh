#!/usr/bin/env bash
# Data-parallel training with the real CLI on a GPU machine (the `device` tool), full-size random weights:
# writes a diffusers-layout Qwen-Image folder, then runs `qwen-zero-prior train` under torchrun for each N in
# $NPROCS (1 2 ...) and each gradient all-reduce in $DP_ALLREDUCE (flat overlap; unset: the config's default),
# each process under a hard per-GPU memory cap of $CAP_GIB (0 = none), with the config's memory plan. Logs and
# one JSON line per run (median s/step, all-reduce wait per rank) in $OUT. Carries: .gpu/whl/diffusers-*.whl
# (and optionally .gpu/tok, the real tokenizer: QWEN_IMAGE_TOKENIZER).
#   OUT=/tmp/out NPROCS="1 2" CAP_GIB=78 STEPS=12 bash bench/dp_gpu.sh
#   OUT=/tmp/out NPROCS=2 DP_ALLREDUCE="flat overlap" STEPS=25 bash bench/dp_gpu.sh      # flat vs overlap
# KILL=1: the kill-and-resume scenario instead: N=2 with a checkpoint every $KILL_CKPT_EVERY steps; once the first
# checkpoint exists, SIGKILL the worker of LOCAL_RANK 1; the job must end non-zero with a clear message (rank 0's
# "lost the other training processes", or torchrun naming the SIGKILLed rank); then resume that checkpoint in ONE
# process ($RESUME_STEPS more steps, batch $RESUME_BATCH: 2 keeps the global batch) and check weights.zip. Prints
# one JSON line ("pass": true/false) and exits non-zero if it failed.
#   OUT=/tmp/out KILL=1 CAP_GIB=78 bash bench/dp_gpu.sh
# On a CPU (gloo, tiny model; a dry run of the script itself):
#   OUT=/tmp/o TMPROOT=/tmp/dp-cpu DEVICE=cpu SIZE=tiny RES=32 RANK_LORA=4 DTYPE=float32 KILL=1 bash bench/dp_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# NVLink multicast stays off (a program using it can take the host's GPUs out of service), also for torchrun's
# children: set here even where the machine's environment already sets them
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/out}
tmp=${TMPROOT:-/tmp}   # the scratch folders below live here (a shared machine: give each user their own)
device=${DEVICE:-}     # empty: the config's (auto); cpu: gloo, no memory cap
cap=${CAP_GIB:-78}; [[ $device == cpu ]] && cap=${CAP_GIB:-0}
mkdir -p "$out" "$tmp/pkgs" "$tmp/site" "$tmp/zp-cap"
carry=${CARRY:-.gpu}
compgen -G "$carry/whl/diffusers-*.whl" >/dev/null && \
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$carry"/whl/diffusers-*.whl
ln -sfn "$repo" "$tmp/pkgs/qwen_zero_prior"   # the repository root is the package
[[ -d $carry/tok ]] && export QWEN_IMAGE_TOKENIZER=$PWD/$carry/tok
cat > "$tmp/zp-cap/sitecustomize.py" <<'PY'
import os
_cap = float(os.environ.get("ZP_CAP_GIB") or 0)
if _cap:  # before anything else touches CUDA: this process's GPU (torchrun's LOCAL_RANK) is capped
    import torch
    _dev = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_per_process_memory_fraction(min(1.0, _cap * 2**30 / torch.cuda.get_device_properties(_dev).total_memory), _dev)
PY
export PYTHONPATH=$tmp/zp-cap:$tmp/site:$tmp/pkgs${PYTHONPATH:+:$PYTHONPATH}
suffix=""; [[ ${SIZE:-full} == full ]] || suffix=-$SIZE
model=${MODEL:-$tmp/qwen-image-random$suffix}
t0=$(date +%s)
python3 "$repo/bench/write_model_folder.py" "$model" --size "${SIZE:-full}" ${device:+--device $device} 2>&1 | tail -2
echo "model folder ready after $(( $(date +%s) - t0 )) s"
data=$tmp/zp-dp-data-${RES:-1024}
RES=${RES:-1024} python3 - "$data" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
import os
res = int(os.environ.get("RES", "1024"))
for i in range(8):
    Image.fromarray((rng.random((res, res, 3)) * 255).astype(np.uint8)).save(d / f"img_{i}.png")
    (d / f"img_{i}.txt").write_text(f"a photo of <zwx> number {i}", encoding="utf-8")
PY

# the CLI's arguments shared by every run here (then --output and per-run --set)
common=(-m qwen_zero_prior.cli train --dataset "$data"
        --set model.base_model="$model" --set model.dtype="${DTYPE:-bfloat16}" ${MEMORY:+--set model.memory=$MEMORY}
        ${device:+--set model.device=$device}
        --set train.train_placeholder_token=true --set train.rank="${RANK_LORA:-32}" --set train.resolution="${RES:-1024}"
        --set train.batch_size=1)

summary_json() {  # $1 log, $2 N, $3 mode, $4 exit: one JSON line from the ranks' summary lines
  python3 - "$@" <<'PY'
import json, re, sys
log, n, mode, rc = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
steps, waits, sps = [], [], []
for line in open(log, encoding="utf-8", errors="replace"):
    m = re.search(r"median ([\d.]+) s/step after the first .*?, ([\d.]+|nan) samples/s", line)
    if m:
        steps.append(float(m[1])); sps.append(float(m[2]))
        w = re.search(r"gradient all-reduce \((\w+)\) wait(?: incl. packing)?: median ([\d.]+) ms/step", line)
        if w:
            waits.append(float(w[2]))
print(json.dumps({"processes": n, "dp_allreduce": mode, "exit": rc, "median_s_per_step": steps,
                  "allreduce_wait_ms": waits, "samples_per_s": min(sps) if sps else None, "log": log}))
PY
}

if [[ ${KILL:-0} == 1 ]]; then
  run=$tmp/zp-dp-kill; rm -rf "$run"; log=$out/dp-kill.log
  every=${KILL_CKPT_EVERY:-2}
  ZP_CAP_GIB=$cap python3 -m torch.distributed.run --standalone --nproc_per_node 2 "${common[@]}" --output "$run/weights.zip" \
    --set train.steps="${KILL_STEPS:-1000}" --set train.checkpoint_every="$every" --set train.keep_checkpoints=0 \
    ${DP_ALLREDUCE:+--set train.dp_allreduce=${DP_ALLREDUCE%% *}} ${EXTRA_SET:-} > "$log" 2>&1 &
  agent=$!
  deadline=$(( $(date +%s) + ${RUN_TIMEOUT:-600} ))
  first=""
  while [[ -z $first ]] && kill -0 "$agent" 2>/dev/null && (( $(date +%s) < deadline )); do
    sleep 1; first=$(compgen -G "$run/checkpoints/step-*" | sort | head -1)
  done
  victim=""
  for c in $(pgrep -P "$agent"); do  # torchrun's workers are its children; LOCAL_RANK=1 is in the victim's env
    tr '\0' '\n' < "/proc/$c/environ" 2>/dev/null | grep -qx "LOCAL_RANK=1" && victim=$c
  done
  killed_at=$(date +%s)
  [[ -n $first && -n $victim ]] && kill -9 "$victim"
  while kill -0 "$agent" 2>/dev/null && (( $(date +%s) < deadline + 120 )); do sleep 1; done
  kill -0 "$agent" 2>/dev/null && { echo "torchrun still running: stopping it"; kill -9 "$agent"; }
  wait "$agent"; job_rc=$?
  ended_s=$(( $(date +%s) - killed_at ))
  clear=false
  grep -q "lost the other training processes" "$log" && clear=true
  grep -q "Root Cause" "$log" && grep -Eq "SIGKILL|Signal 9" "$log" && clear=true
  last=$(compgen -G "$run/checkpoints/step-*" | sort | tail -1)
  ck=0; [[ -n $last ]] && ck=$(( 10#${last##*step-} ))
  echo "== killed rank 1 (pid ${victim:-none}) after ${first##*/}; torchrun exit $job_rc ${ended_s} s later; last checkpoint ${last##*/}"
  grep -E "lost the other|Root Cause|SIGKILL|Signal 9|error:" "$log" | tail -6
  rlog=$out/dp-kill-resume.log
  ZP_CAP_GIB=$cap timeout "${RUN_TIMEOUT:-600}" python3 "${common[@]}" --output "$run/weights.zip" --resume "$run" \
    --set train.steps=$(( ck + ${RESUME_STEPS:-2} )) --set train.batch_size="${RESUME_BATCH:-2}" \
    --set train.checkpoint_every=0 ${EXTRA_SET:-} > "$rlog" 2>&1
  resume_rc=$?
  echo "== resumed in 1 process: exit $resume_rc"
  grep -E "resumed from|s/step|error:" "$rlog" | tail -4
  python3 - "$run/weights.zip" "$job_rc" "$clear" "$resume_rc" "$ck" "$ended_s" "${victim:-}" "$log" "$rlog" <<'PY'
import json, sys, zipfile
zp, job_rc, clear, resume_rc, ck, ended, victim, log, rlog = sys.argv[1:]
steps = None
try:
    with zipfile.ZipFile(zp) as z:
        steps = json.loads(z.read("meta.json")).get("steps")
except (OSError, KeyError, zipfile.BadZipFile, ValueError):
    pass
row = {"scenario": "kill-and-resume", "killed_pid": int(victim) if victim else None, "job_exit": int(job_rc),
       "clear_message": clear == "true", "job_ended_s_after_kill": int(ended), "checkpoint_step": int(ck),
       "resume_processes": 1, "resume_exit": int(resume_rc), "weights_zip_steps": steps, "log": log,
       "resume_log": rlog}
row["pass"] = bool(victim and int(job_rc) != 0 and row["clear_message"] and int(resume_rc) == 0
                   and steps is not None and steps > int(ck))
print(json.dumps(row))
sys.exit(0 if row["pass"] else 1)
PY
  exit $?
fi

for n in ${NPROCS:-1 2}; do
  for mode in ${DP_ALLREDUCE:-default}; do
    tag=n$n${DP_ALLREDUCE:+-$mode}
    rm -rf "$tmp/zp-dp-run-$tag"
    ZP_CAP_GIB=$cap timeout "${RUN_TIMEOUT:-300}" python3 -m torch.distributed.run --standalone --nproc_per_node "$n" \
      "${common[@]}" --output "$tmp/zp-dp-run-$tag/weights.zip" \
      --set train.steps="${STEPS:-12}" --set train.checkpoint_every=0 \
      ${DP_ALLREDUCE:+--set train.dp_allreduce=$mode} ${EXTRA_SET:-} > "$out/dp-$tag.log" 2>&1
    rc=$?
    echo "== N=$n ${DP_ALLREDUCE:+dp_allreduce=$mode }exit $rc after $(( $(date +%s) - t0 )) s"
    grep -E "memory plan|s/step|Error|error:" "$out/dp-$tag.log" | tail -12
    summary_json "$out/dp-$tag.log" "$n" "$mode" "$rc" | tee -a "$out/dp.jsonl"
  done
done
