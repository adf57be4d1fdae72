"""Data-parallel training under torchrun on CPU (gloo, 2 processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from qwen_zero_prior.training.archive import load_archive
from qwen_zero_prior.training.checkpoint import list_checkpoints


def _config(tmp_path: Path, model_dir: Path, batch_size: int, steps: int, checkpoint_every: int = 2) -> Path:
    p = tmp_path / f"cfg_b{batch_size}_s{steps}.yaml"
    p.write_text(
        f"model:\n  base_model: {model_dir}\n  dtype: float32\n  device: cpu\n"
        f"train:\n  train_placeholder_token: true\n  rank: 4\n  steps: {steps}\n  batch_size: {batch_size}\n"
        f"  resolution: 32\n  checkpoint_every: {checkpoint_every}\n  learning_rate: 3.0e-3\n"
        f"  token_learning_rate: 5.0e-2\n  seed: 3\n"
    )
    return p


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "QZP_DIST_TIMEOUT_S": "60", **extra}


def _train_cmd(nproc: int, cfg: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    cli = ["-m", "qwen_zero_prior.cli", "train", "--config", str(cfg), "--dataset", str(dataset),
           "--output", str(out), *extra]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cli]


def test_two_ranks_of_batch_1_equal_one_rank_of_batch_2(tiny_model_dir, tmp_path):
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n=4, size=32)
    two = subprocess.run(_train_cmd(2, _config(tmp_path, tiny_model_dir, 1, 4), data, tmp_path / "dp" / "weights.zip"),
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run(_train_cmd(1, _config(tmp_path, tiny_model_dir, 2, 4), data, tmp_path / "sp" / "weights.zip"),
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    a, b = load_archive(tmp_path / "dp" / "weights.zip"), load_archive(tmp_path / "sp" / "weights.zip")
    assert a.meta.steps == b.meta.steps == 4
    assert torch.allclose(a.vector, b.vector, atol=1e-5, rtol=1e-4), (a.vector - b.vector).abs().max()
    assert a.vector.abs().sum() > 0
    # AdamW divides by sqrt(v): float rounding between a batched and a split forward shows up as ~1e-4 in
    # weights that moved by ~1e-2 per step; the LoRA matrices agree to well under one step's update
    diff = max((a.lora_state_dict[k] - b.lora_state_dict[k]).abs().max().item() for k in a.lora_state_dict)
    print(f"2x batch-1 vs 1x batch-2: max LoRA diff {diff:.2e}, vector diff {(a.vector - b.vector).abs().max():.2e}")
    assert diff < 1e-3

    # only rank 0 writes: rank 1 saved no checkpoint and printed no archive line
    log = two.stderr + two.stdout
    rank0 = [line for line in log.splitlines() if "[rank 0]" in line]
    rank1 = [line for line in log.splitlines() if "[rank 1]" in line]
    assert any("data parallel: rank 1 of 2" in line for line in rank1)
    assert any("checkpoint saved" in line for line in rank0)
    assert not any("checkpoint saved" in line for line in rank1)
    assert two.stdout.count("archive:") == 1
    assert [p.name for p in list_checkpoints(tmp_path / "dp" / "checkpoints")] == ["step-000002", "step-000004"]

    # a checkpoint from 2 processes resumes in 1 process, to the new step count
    more = subprocess.run(_train_cmd(1, _config(tmp_path, tiny_model_dir, 2, 6), data, tmp_path / "dp" / "weights.zip",
                                     "--resume", str(tmp_path / "dp")),
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert more.returncode == 0, more.stderr[-4000:]
    assert load_archive(tmp_path / "dp" / "weights.zip").meta.steps == 6


def _pid_of_rank(marker: str, rank: int) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"QZP_TEST_MARKER={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def test_killed_rank_fails_the_job_with_a_clear_message(tiny_model_dir, tmp_path):
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n=4, size=32)
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(_train_cmd(2, _config(tmp_path, tiny_model_dir, 1, 100000), data, tmp_path / "run" / "weights.zip"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(QZP_TEST_MARKER=marker))
    try:
        deadline = time.time() + 300
        while not list_checkpoints(tmp_path / "run" / "checkpoints") and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.2)
        pid = _pid_of_rank(marker, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        out, _ = proc.communicate(timeout=120)  # it must end, not hang
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"job ended {elapsed:.1f} s after rank 1 was killed; output tail:\n{out[-1500:]}")
    assert proc.returncode != 0
    # torchrun's agent stops rank 0 and names the rank that died (or rank 0 reports the lost peer itself)
    assert "lost the other training processes" in out or ("Root Cause" in out and "SIGKILL" in out), out[-4000:]
    assert not (tmp_path / "run" / "weights.zip").exists()
    assert list_checkpoints(tmp_path / "run" / "checkpoints")  # the last checkpoint is there to resume from


_PEER_SCRIPT = """
import os, sys, torch
from qwen_zero_prior.training import distributed as d
ctx = d.from_env()
if ctx.rank == 1:
    os._exit(0)  # a rank that disappears without a word
try:
    d.average(ctx, [torch.ones(4)], step=7)
except d.RankLostError as e:
    print(e)
    sys.exit(3)
"""


def test_lost_peer_raises_clear_error_without_an_agent(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "peer.py"
    script.write_text(_PEER_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), QZP_DIST_TIMEOUT_S="20"))
             for r in (0, 1)]
    out0, _ = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=60)
    assert procs[0].returncode == 3, out0[-3000:]
    assert "rank 0: lost the other training processes in the gradient all-reduce at step 7" in out0


def test_accelerate_launch_two_processes(tiny_model_dir, tmp_path):
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    pytest.importorskip("accelerate")
    data = make_synthetic_dataset(tmp_path / "data", n=4, size=32)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *_train_cmd(1, _config(tmp_path, tiny_model_dir, 1, 2, checkpoint_every=0), data, tmp_path / "w.zip")[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data parallel: rank 1 of 2" in proc.stderr
    assert load_archive(tmp_path / "w.zip").meta.steps == 2
