"""Training processes ask cuBLAS for no workspace (training/cublas.py): when, when not, and that the CLI's and Cog's
``train`` ask before anything touches CUDA; on a GPU, that the products then run without memsets or split-K."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qwen_zero_prior.training import cublas


@pytest.fixture
def gpu_like(monkeypatch):
    """A process with a GPU that nothing has initialized yet (what the CLI and Cog see at their start)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


@pytest.fixture
def clean_env(monkeypatch):
    """This process's environment without the two settings, restored to what it was afterwards (also where the code
    under test adds them)."""
    for key in cublas.NO_WORKSPACE:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


def test_sets_no_workspace_before_cuda_starts(gpu_like):
    env = {"PATH": "/bin"}
    assert cublas.no_workspace_for_training(env) == "none"
    assert env == {"PATH": "/bin", "CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}
    assert cublas.workspace_setting(env) == "CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0"


@pytest.mark.parametrize("key", sorted(cublas.NO_WORKSPACE))
def test_a_users_setting_is_kept(gpu_like, key):
    env = {key: ":4096:8" if key == cublas.CONFIG_ENV else "1024"}
    before = dict(env)
    answer = cublas.no_workspace_for_training(env)
    assert env == before
    assert answer.startswith("kept as set in the environment") and key in answer


def test_too_late_without_cuda_or_when_deterministic(monkeypatch):
    env: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cublas.no_workspace_for_training(env) == "unchanged: no CUDA" and env == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert "CUDA was initialized before training started" in cublas.no_workspace_for_training(env) and env == {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "use_deterministic_algorithms" in cublas.no_workspace_for_training(env) and env == {}
    assert cublas.workspace_setting(env) == "PyTorch's default"


def test_cli_train_asks_before_training_starts(gpu_like, clean_env, monkeypatch, tmp_path, caplog):
    """``qwen-zero-prior train`` sets it before the core's train runs (which is where CUDA starts)."""
    from qwen_zero_prior import cli
    from qwen_zero_prior.training import run

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(cfg, dataset, output, **kwargs):
        seen.update({k: os.environ.get(k) for k in cublas.NO_WORKSPACE})
        raise Stop

    monkeypatch.setattr(run, "train", fake_train)
    data = tmp_path / "data"
    data.mkdir()
    caplog.set_level("INFO", logger="qwen_zero_prior.training.cublas")
    with pytest.raises(Stop):
        cli.main(["train", "--dataset", str(data), "--output", str(tmp_path / "out" / "weights.zip"),
                  "--set", "model.device=cpu"])
    assert seen == cublas.NO_WORKSPACE
    assert "cuBLAS without a workspace for training" in caplog.text


def test_cog_train_asks_before_reading_the_gpu(gpu_like, clean_env, monkeypatch, tmp_path):
    """Cog's ``train`` sets it before ``config_for_training`` (which reads the GPU's compute capability, and so
    initializes CUDA)."""
    pytest.importorskip("cog", reason="cog is not installed (pip install -e '.[cog]'): Cog's train SKIPPED")
    import train as cog_train

    order = []

    def fake_config(**inputs):
        order.append(("config", {k: os.environ.get(k) for k in cublas.NO_WORKSPACE}))
        return "cfg"

    def fake_run(cfg, dataset, archive):
        order.append(("run", cfg))
        archive.write_bytes(b"zip")
        return "trained"

    monkeypatch.setattr(cog_train, "config_for_training", fake_config)
    monkeypatch.setattr(cog_train, "run_training", fake_run)
    out = cog_train.train(dataset=tmp_path / "d.zip", rank=2, steps=1, learning_rate=1e-4, token_learning_rate=1e-3,
                          train_placeholder_token=True, placeholder_token="<zwx>", placeholder_init_std=1e-5,
                          resolution=32, batch_size=1, seed=0)
    assert order == [("config", cublas.NO_WORKSPACE), ("run", "cfg")]
    assert str(out.weights).endswith("weights.zip")


GPU_PROBE = textwrap.dedent("""
    import json, torch
    from torch.profiler import profile, ProfilerActivity
    from qwen_zero_prior.training import cublas
    print(cublas.no_workspace_for_training())
    d, bf = "cuda", torch.bfloat16
    x, h = torch.randn(4096, 12288, device=d, dtype=bf), torch.randn(4096, 32, device=d, dtype=bf)
    w = torch.randn(3072, 3072, device=d, dtype=bf)
    def products():  # a LoRA weight gradient (thin output, long K: split-K with a workspace) and a square product
        return h.t() @ x, x[:, :3072] @ w
    products(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        products(); torch.cuda.synchronize()
    names = [e.name for e in p.events() if e.device_type.name == "CUDA"]
    print(json.dumps(names))
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: which kernels cuBLAS runs")
def test_on_the_gpu_the_products_run_without_memsets_or_split_k(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in cublas.NO_WORKSPACE}
    proc = subprocess.run([sys.executable, "-c", GPU_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer, names = proc.stdout.splitlines()[0], json.loads(proc.stdout.splitlines()[-1])
    assert answer == "none"
    assert len(names) == 2, names  # one kernel a product: no memset before it, no split-K reduce after it
    assert not [n for n in names if "emset" in n or "splitK" in n], names
