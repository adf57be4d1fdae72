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

    # the summary line says how long the steps waited for the all-reduce (the default: buckets during the backward)
    assert "gradient all-reduce (overlap) wait: median" in log

    # one flat all-reduce after the backward trains the same bits; so do tiny buckets (several per step)
    flat = subprocess.run(_train_cmd(2, _config(tmp_path, tiny_model_dir, 1, 4), data, tmp_path / "fl" / "weights.zip",
                                     "--set", "train.dp_allreduce=flat"),
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert flat.returncode == 0, flat.stderr[-4000:]
    assert "gradient all-reduce (flat) wait incl. packing: median" in flat.stderr
    over = subprocess.run(_train_cmd(2, _config(tmp_path, tiny_model_dir, 1, 4), data, tmp_path / "ov" / "weights.zip"),
                          capture_output=True, text=True, env=_env(QZP_DP_BUCKET_MB="0.002"), timeout=600)
    assert over.returncode == 0, over.stderr[-4000:]
    for other in (load_archive(tmp_path / "fl" / "weights.zip"), load_archive(tmp_path / "ov" / "weights.zip")):
        assert torch.equal(a.vector, other.vector)
        assert a.lora_state_dict.keys() == other.lora_state_dict.keys()
        assert all(torch.equal(a.lora_state_dict[k], other.lora_state_dict[k]) for k in a.lora_state_dict)
        assert a.meta.extra["final_loss"] == other.meta.extra["final_loss"]

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
    print(e, flush=True)
    # not sys.exit: under load, gloo's teardown of a group whose peer vanished may abort the interpreter (SIGABRT)
    # after the message; what is tested here is the error the library raises
    os._exit(3)
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


_OVERLAP_SCRIPT = """
import os, sys, torch
from qwen_zero_prior.training import distributed as d
ctx = d.from_env()
torch.manual_seed(0)
# four parameters of different sizes (a bucket sent out of order would meet a bucket of another size)
params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 7, 11)]
def loss_of(rank):
    x = torch.arange(1.0, 4.0) * (rank + 1)
    h = (params[0] * x).sum()
    h = h * params[1].sum()
    if rank == 0:  # rank 1's graph never reaches params[2]: it gets no gradient (zeros) there
        h = h + params[2].pow(2).sum() * (rank + 2)
    return h * params[3].mean() + params[3].pow(3).sum()
results = {}
for mode in ("flat", "overlap"):
    for p in params:
        p.grad = None
    loss = loss_of(ctx.rank)
    if mode == "overlap":
        ov = d.OverlappedAverage(ctx, params, cap_bytes=16)  # one parameter per bucket
        ov.begin(loss, step=0)
        fired = []
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p, fired=fired: fired.append(ov._next))
        loss.backward()
        mean_loss = ov.finish()
        ov.close()
        # rank 1: params[3]'s bucket (first) went out from its hook, the ones behind params[2]'s waited for finish
        print("buckets sent when the hooks ran:", fired, flush=True)
    else:
        loss.backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        mean_loss = loss.detach().reshape(1).clone()
        d.average(ctx, [p.grad for p in params] + [mean_loss], step=0)
    results[mode] = [p.grad.clone() for p in params] + [mean_loss.clone()]
same = all(torch.equal(a, b) for a, b in zip(results["flat"], results["overlap"]))
# the expected mean, gathered independently
import torch.distributed as dist
for p in params:
    p.grad = None
loss = loss_of(ctx.rank)
loss.backward()
grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
gathered = [[torch.zeros_like(g) for _ in range(ctx.world)] for g in grads]
for g, out in zip(grads, gathered):
    dist.all_gather(out, g)
close = all(torch.allclose(r, sum(o) / ctx.world) for r, o in zip(results["overlap"], gathered))
print(f"rank {ctx.rank}: identical={same} mean={close} nonzero={bool(results['overlap'][2].abs().sum() > 0)}", flush=True)
d.shutdown(ctx)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_plain_processes(argv: list[str], tmp_path: Path, **env) -> list[tuple[int, str]]:
    """``argv`` in two processes that join one gloo group from the environment (no torchrun agent)."""
    port = _free_port()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), **env))
             for r in (0, 1)]
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=240)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def test_overlapped_buckets_average_like_the_flat_all_reduce(tmp_path):
    """Bucketed all-reduce from gradient hooks == one flat all-reduce, bit for bit, also when one rank's graph
    leaves a parameter without gradient (the buckets still go out in the same order on both ranks)."""
    script = tmp_path / "overlap.py"
    script.write_text(_OVERLAP_SCRIPT)
    (rc0, out0), (rc1, out1) = _two_plain_processes([sys.executable, str(script)], tmp_path)
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + out1[-3000:]
    assert "rank 0: identical=True mean=True nonzero=True" in out0, out0[-3000:]
    assert "rank 1: identical=True mean=True nonzero=True" in out1, out1[-3000:]
    # buckets (reverse order) [p3] [p2] [p1] [p0]: on rank 0 each goes out from its own hook; on rank 1 p2 has
    # no gradient, so p1 and p0 (ready) wait behind it and go out in finish()
    assert "buckets sent when the hooks ran: [1, 2, 3, 4]" in out0, out0[-3000:]
    assert "buckets sent when the hooks ran: [1, 1, 1]" in out1, out1[-3000:]


def test_rank_0_setup_failure_stops_the_other_ranks_with_its_message(tiny_model_dir, tmp_path):
    """Rank 0 cannot write its output folder: it says why, and rank 1 stops at once with that message instead of
    loading the model and waiting for rank 0 at its first all-reduce."""
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n=4, size=32)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    cli = [sys.executable, "-m", "qwen_zero_prior.cli", "train", "--config", str(_config(tmp_path, tiny_model_dir, 1, 2)),
           "--dataset", str(data), "--output", str(blocker / "weights.zip")]
    (rc0, out0), (rc1, out1) = _two_plain_processes(cli, tmp_path, QZP_DIST_TIMEOUT_S="900")
    why = f"output folder {blocker} cannot be created"
    assert rc0 == 2 and f"error: {why}" in out0, out0[-3000:]
    assert rc1 == 2, out1[-3000:]
    assert f"error: rank 1: stopping because rank 0 could not prepare the run: OutputError: {why}" in out1, out1[-3000:]
    assert "dataset:" not in out1  # it stopped before scanning the dataset or loading a model


def test_overlap_is_refused_when_a_gradient_arrives_twice(tmp_path):
    """A backward that accumulates into a gradient after its bucket was sent would lose that part: one clear error."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import sys, torch\n"
        "from qwen_zero_prior.training import distributed as d\n"
        "ctx = d.from_env()\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "ov = d.OverlappedAverage(ctx, [p])\n"
        "loss = (p * 2).sum()\n"
        "ov.begin(loss, step=1)\n"
        "loss.backward(retain_graph=True)\n"
        "loss.backward()\n"
        "try:\n"
        "    ov.finish()\n"
        "except RuntimeError as e:\n"
        "    print(e, flush=True)\n"
        "    sys.exit(4)\n")
    (rc0, out0), (rc1, out1) = _two_plain_processes([sys.executable, str(script)], tmp_path)
    assert rc0 == rc1 == 4, out0[-2000:] + out1[-2000:]
    assert ("train.dp_allreduce: overlap: a gradient (shape [3]) was accumulated again after its bucket was sent "
            "(the backward visits it twice); set train.dp_allreduce: flat") in out0


@pytest.mark.parametrize("raw, needle", [("lots", "QZP_DP_BUCKET_MB='lots' is not a number of MB"),
                                         ("0", "QZP_DP_BUCKET_MB='0' must be a positive number of MB"),
                                         ("-3", "QZP_DP_BUCKET_MB='-3' must be a positive number of MB")])
def test_bad_bucket_size_is_refused(monkeypatch, raw, needle):
    from qwen_zero_prior.training.config import ConfigError
    from qwen_zero_prior.training.distributed import bucket_bytes

    monkeypatch.setenv("QZP_DP_BUCKET_MB", raw)
    with pytest.raises(ConfigError) as e:
        bucket_bytes()
    assert needle in str(e.value)
    monkeypatch.setenv("QZP_DP_BUCKET_MB", "0.5")
    assert bucket_bytes() == 2**19


def test_buckets_follow_reverse_order_and_size(monkeypatch):
    """DDP's layout: the last parameters first, a bucket closes once it holds the cap (float32 bytes)."""
    from qwen_zero_prior.training.distributed import DistContext, OverlappedAverage

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 20, 30, 40)]
    ov = OverlappedAverage(DistContext(0, 2, 0), params, cap_bytes=200)  # 50 float32 values
    assert [[p.numel() for p in b] for b in ov.buckets] == [[40, 30], [20, 10]]
    ov.close()
    assert all(not p._post_accumulate_grad_hooks for p in params)


def test_launchers_keep_nvlink_multicast_off(monkeypatch):
    from qwen_zero_prior.training.distributed import multicast_off_env

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    env = multicast_off_env()
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["PATH"] == os.environ["PATH"]
