#!/usr/bin/env bash
# Data-parallel training with the real CLI on a GPU machine (the `device` tool), full-size random weights:
# writes a diffusers-layout Qwen-Image folder, then runs `qwen-zero-prior train` under torchrun for each N in
# $NPROCS (1 2 ...), each process under a hard per-GPU memory cap of $CAP_GIB (0 = none), with the config's
# memory plan. Logs and JSON lines in $OUT. Carries: .gpu/whl/diffusers-*.whl (and optionally .gpu/tok, the
# real tokenizer: QWEN_IMAGE_TOKENIZER).
#   OUT=/tmp/out NPROCS="1 2" CAP_GIB=78 STEPS=12 bash bench/dp_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# NVLink multicast stays off (a program using it can take the host's GPUs out of service), also for torchrun's
# children: set here even where the machine's environment already sets them
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/out}; mkdir -p "$out" /tmp/pkgs /tmp/site /tmp/zp-cap
carry=${CARRY:-.gpu}
compgen -G "$carry/whl/diffusers-*.whl" >/dev/null && \
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/whl/diffusers-*.whl
ln -sfn "$repo" /tmp/pkgs/qwen_zero_prior   # the repository root is the package
[[ -d $carry/tok ]] && export QWEN_IMAGE_TOKENIZER=$PWD/$carry/tok
cat > /tmp/zp-cap/sitecustomize.py <<'PY'
import os
_cap = float(os.environ.get("ZP_CAP_GIB") or 0)
if _cap:  # before anything else touches CUDA: this process's GPU (torchrun's LOCAL_RANK) is capped
    import torch
    _dev = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_per_process_memory_fraction(min(1.0, _cap * 2**30 / torch.cuda.get_device_properties(_dev).total_memory), _dev)
PY
export PYTHONPATH=/tmp/zp-cap:/tmp/site:/tmp/pkgs${PYTHONPATH:+:$PYTHONPATH}
model=${MODEL:-/tmp/qwen-image-random}
t0=$(date +%s)
python3 "$repo/bench/write_model_folder.py" "$model" --size "${SIZE:-full}" 2>&1 | tail -2
echo "model folder ready after $(( $(date +%s) - t0 )) s"
data=/tmp/zp-dp-data
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
for n in ${NPROCS:-1 2}; do
  rm -rf "/tmp/zp-dp-run-$n"
  ZP_CAP_GIB=${CAP_GIB:-78} timeout "${RUN_TIMEOUT:-300}" python3 -m torch.distributed.run --standalone --nproc_per_node "$n" \
    -m qwen_zero_prior.cli train --dataset "$data" --output "/tmp/zp-dp-run-$n/weights.zip" \
    --set model.base_model="$model" --set model.dtype="${DTYPE:-bfloat16}" ${MEMORY:+--set model.memory=$MEMORY} \
    --set train.train_placeholder_token=true --set train.rank="${RANK_LORA:-32}" --set train.resolution="${RES:-1024}" \
    --set train.steps="${STEPS:-12}" --set train.checkpoint_every=0 --set train.batch_size=1 ${EXTRA_SET:-} \
    > "$out/dp-n$n.log" 2>&1
  echo "== N=$n exit $? after $(( $(date +%s) - t0 )) s"
  grep -E "memory plan|s/step|Error|error:" "$out/dp-n$n.log" | tail -12
done
