"""A training process with a compiled fp8 step asks cuBLAS for no workspace (training/cublas.py): when, when not
(every other step keeps PyTorch's), that the CLI's and Cog's ``train`` have the core choose from the memory plan's
settings before any product runs, and on a GPU that the products then run without memsets or split-K."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qwen_zero_prior.training import cublas
from qwen_zero_prior.training.config import ModelConfig


FAST = ModelConfig(compile=True, compile_mode="reduce-overhead", fp8_matmul=True)  # what was measured faster
CUDA = torch.device("cuda")


@pytest.fixture
def clean_env(monkeypatch):
    """This process's environment without the two settings, restored to what it was afterwards (also where the code
    under test adds them)."""
    for key in cublas.NO_WORKSPACE:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


def test_no_workspace_for_a_compiled_fp8_step_with_cuda_graphs():
    env = {"PATH": "/bin"}
    assert cublas.no_workspace_for_training(FAST, CUDA, env) == "none"
    assert env == {"PATH": "/bin", "CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}
    assert cublas.workspace_setting(env) == "CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0"
    assert cublas.no_workspace_for_training(
        ModelConfig(compile=True, compile_mode="max-autotune", fp8_matmul=True), CUDA, {}) == "none"


@pytest.mark.parametrize("model", [
    ModelConfig(),  # eager bf16: the README's defaults (session 35: 1239 vs 643 ms a step without a workspace)
    ModelConfig(compile=True, fp8_matmul=True),  # compiled without CUDA graphs
    ModelConfig(compile=True, compile_mode="max-autotune-no-cudagraphs", fp8_matmul=True),
    ModelConfig(compile=True, compile_mode="reduce-overhead"),  # bf16 products
    ModelConfig(fp8_matmul=True),  # eager fp8
], ids=["eager-bf16", "compile-default", "no-cudagraphs", "graphs-bf16", "eager-fp8"])
def test_every_other_step_keeps_pytorchs_workspace(model):
    env: dict = {}
    assert not cublas.faster_without_workspace(model)
    assert cublas.no_workspace_for_training(model, CUDA, env).startswith("PyTorch's default: no workspace is faster "
                                                                         "only for a step compiled with CUDA graphs")
    assert env == {} and cublas.workspace_setting(env) == "PyTorch's default"


def test_the_same_choice_made_earlier_in_the_process_is_reported_as_none():
    env = dict(cublas.NO_WORKSPACE)
    assert cublas.no_workspace_for_training(FAST, CUDA, env) == "none" and env == cublas.NO_WORKSPACE


def test_set_no_workspace_keeps_a_value_already_there():
    env = {cublas.LT_ENV: "1024"}
    assert cublas.set_no_workspace(env) is False and env == {cublas.LT_ENV: "1024"}
    env = {}
    assert cublas.set_no_workspace(env) is True and env == cublas.NO_WORKSPACE


@pytest.mark.parametrize("key", sorted(cublas.NO_WORKSPACE))
def test_a_users_setting_is_kept(key):
    env = {key: ":4096:8" if key == cublas.CONFIG_ENV else "1024"}
    before = dict(env)
    answer = cublas.no_workspace_for_training(FAST, CUDA, env)
    assert env == before
    assert answer.startswith("kept as set in the environment") and key in answer


def test_unchanged_off_cuda_or_when_deterministic(monkeypatch):
    env: dict = {}
    assert cublas.no_workspace_for_training(FAST, torch.device("cpu"), env) == "unchanged: training on cpu, not CUDA"
    assert env == {}
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "use_deterministic_algorithms" in cublas.no_workspace_for_training(FAST, CUDA, env) and env == {}
    assert cublas.workspace_setting(env) == "PyTorch's default"


def test_cli_train_lets_the_core_choose_for_its_process(clean_env, monkeypatch, tmp_path):
    """``qwen-zero-prior train`` owns its process: it asks the core's train to choose (``tune_process``) and sets
    nothing itself before the memory plan has fixed the settings."""
    from qwen_zero_prior import cli
    from qwen_zero_prior.training import run

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(cfg, dataset, output, **kwargs):
        seen.update(kwargs, env={k: os.environ.get(k) for k in cublas.NO_WORKSPACE})
        raise Stop

    monkeypatch.setattr(run, "train", fake_train)
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(Stop):
        cli.main(["train", "--dataset", str(data), "--output", str(tmp_path / "out" / "weights.zip"),
                  "--set", "model.device=cpu"])
    assert seen["tune_process"] is True
    assert seen["env"] == {k: None for k in cublas.NO_WORKSPACE}


@pytest.mark.parametrize("processes", [1, 2])
def test_cog_train_lets_the_core_choose_in_each_training_process(clean_env, monkeypatch, tmp_path, processes):
    """Cog's ``train`` sets nothing in its own process (data-parallel workers would inherit it) and has the core's
    train choose where it trains: in this process, or in each torchrun worker (``cog_support._worker``)."""
    import cog_support
    import yaml

    from qwen_zero_prior.training import run
    from qwen_zero_prior.training.config import Config

    calls = []

    def fake_core(cfg, dataset, archive, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(run, "train", fake_core)
    cfg = Config.from_dict({"model": {"device": "cpu"}})
    if processes == 1:
        monkeypatch.setattr(cog_support, "train_processes", lambda: 1)
        with pytest.raises(RuntimeError, match="stop here"):
            cog_support.run_training(cfg, tmp_path / "d.zip", tmp_path / "weights.zip")
    else:  # a torchrun worker's entry point
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        with pytest.raises(RuntimeError, match="stop here"):
            cog_support._worker(["--config", str(tmp_path / "c.yaml"), "--dataset", "d", "--output", "o.zip"])
    assert calls == [{"tune_process": True}]
    assert not any(k in os.environ for k in cublas.NO_WORKSPACE)


EAGER = ModelConfig()


def test_train_hands_its_callers_ownership_to_the_model_load(monkeypatch, tmp_path):
    """``run.train(..., tune_process=...)`` reaches ``_load_for_training`` (where the choice is made), False unless
    the caller says so."""
    from qwen_zero_prior.training import run
    from qwen_zero_prior.training.config import Config

    seen = []

    class Stop(Exception):
        pass

    def load(cfg, ctx, tune_process=False):
        seen.append(tune_process)
        raise Stop

    monkeypatch.setattr(run, "_load_for_training", load)
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(data / "a.png")
    (data / "a.txt").write_text("a photo of <zwx>")
    cfg = Config.from_dict({"model": {"device": "cpu"}})
    for kwargs in ({}, {"tune_process": True}):
        with pytest.raises(Stop):
            run.train(cfg, data, tmp_path / f"out{len(seen)}" / "weights.zip", **kwargs)
    assert seen == [False, True]


@pytest.mark.parametrize("asked, planned, tune, expected", [
    (EAGER, FAST, True, cublas.NO_WORKSPACE),
    (FAST, EAGER, True, {}),  # asked for the fast step, the plan left it eager: the plan's settings decide
    (FAST, ModelConfig(compile=True, fp8_matmul=True), True, {}),  # the plan recomputes blocks, without graphs
    (EAGER, FAST, False, {}),  # a caller that does not own the process (tests, a notebook, a pipe passed in)
], ids=["planned-fast", "planned-eager", "planned-no-graphs", "not-the-process-owner"])
def test_the_core_chooses_from_the_planned_settings_before_the_model_is_placed(clean_env, monkeypatch, asked,
                                                                               planned, tune, expected):
    """``run._load_for_training`` asks after ``memory.resolve`` (whose settings decide) and before
    ``place_pipeline`` (the first work on the GPU), only where its caller owns the process."""
    from qwen_zero_prior.training import memory, run
    from qwen_zero_prior.training.config import Config

    order = []
    monkeypatch.setattr(run, "resolve_device", lambda name: CUDA)
    monkeypatch.setattr(run, "load_pipeline", lambda m, device, place: "pipe")
    monkeypatch.setattr(memory, "weights_bytes", lambda pipe, m, placing=False: 1)
    monkeypatch.setattr(memory, "without_blocked_graphs", lambda cfg, device: cfg)

    keys = ("compile", "compile_mode", "fp8_matmul")

    def resolve(cfg, weights, device, parts=None, load_bytes=None):
        order.append("plan")
        return Config.from_dict({"model": {k: getattr(planned, k) for k in keys}}), None

    monkeypatch.setattr(memory, "resolve", resolve)
    import qwen_zero_prior.training.families as families

    monkeypatch.setattr(families, "detect_pipeline", lambda pipe: type("F", (), {"name": "qwen-image"})())
    monkeypatch.setattr(run, "place_pipeline", lambda pipe, m, device, for_training: order.append(
        ("place", {k: os.environ.get(k) for k in cublas.NO_WORKSPACE if k in os.environ})))
    given = Config.from_dict({"model": {"device": "cuda", **{k: getattr(asked, k) for k in keys}}})
    pipe, cfg = run._load_for_training(given, run.distributed.DistContext(), tune)
    assert order == ["plan", ("place", expected)]
    assert cfg.model.fp8_matmul == planned.fp8_matmul


GPU_PROBE = textwrap.dedent("""
    import json, torch
    from torch.profiler import profile, ProfilerActivity
    from qwen_zero_prior.training import cublas
    from qwen_zero_prior.training.config import ModelConfig
    torch.zeros(1, device="cuda"); torch.cuda.mem_get_info()  # CUDA started (as the memory plan does), no product yet
    fast = ModelConfig(compile=True, compile_mode="reduce-overhead", fp8_matmul=True)
    import sys
    model = fast if sys.argv[1] == "fast" else ModelConfig()  # the control: an eager step keeps the workspace
    print(cublas.no_workspace_for_training(model, torch.device("cuda")))
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
    """Chosen after CUDA started (as after the memory plan), no workspace still takes effect: one kernel a product,
    no memset, no split-K. The control, an eager step's choice in a process of its own, keeps PyTorch's workspace and
    runs a memset or a split-K reduce, so the shapes do exercise what the choice removes."""
    env = {k: v for k, v in os.environ.items() if k not in cublas.NO_WORKSPACE}
    runs = {}
    for which in ("fast", "eager"):
        proc = subprocess.run([sys.executable, "-c", GPU_PROBE, which], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[which] = proc.stdout.splitlines()[0], json.loads(proc.stdout.splitlines()[-1])
    answer, names = runs["fast"]
    assert answer == "none"
    assert len(names) == 2, names  # one kernel a product: no memset before it, no split-K reduce after it
    assert not [n for n in names if "emset" in n or "splitK" in n], names
    answer, names = runs["eager"]
    assert answer.startswith("PyTorch's default")
    assert [n for n in names if "emset" in n or "splitK" in n], names
