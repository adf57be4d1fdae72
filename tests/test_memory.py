"""``model.memory``: the plan is chosen from the memory this process may use, and no allowed setting crashes."""

import math

import pytest
import torch

from qwen_zero_prior.training import memory
from qwen_zero_prior.training.config import Config, ConfigError

GIB = 2**30
FULL_WEIGHTS = int(54.0 * GIB)  # Qwen-Image bf16: 20.4B DiT + Qwen2.5-VL-7B (with its vision tower) + VAE
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("cap_gib, res, expected", [
    (139.8, 1024, "resident"),   # an H200: everything resident
    (78.0, 1024, "checkpoint"),  # an 80 GB card: resident would not fit (it OOMed at step 1 there)
    (78.0, 512, "resident"),     # a quarter of the image tokens: resident fits again
    (44.0, 1024, "offload"),     # less than the bf16 weights themselves
    (24.0, 1024, "offload"),     # a 24 GB card
])
def test_auto_picks_the_fastest_plan_that_fits(cap_gib, res, expected):
    plan = memory.choose("auto", weights_bytes=FULL_WEIGHTS, resolution=res, batch_size=1, device=CUDA,
                         capacity_bytes=cap_gib * GIB)
    assert plan.mode == expected, plan
    assert f"{cap_gib:.1f} GiB" in plan.reason and expected in plan.reason
    assert plan.gradient_checkpointing == (expected != "resident") and plan.offload == (expected == "offload")


def test_auto_counts_batch_and_graph_pools():
    kw = dict(weights_bytes=FULL_WEIGHTS, resolution=1024, device=CUDA, capacity_bytes=100 * GIB)
    assert memory.choose("auto", batch_size=1, **kw).mode == "resident"
    assert memory.choose("auto", batch_size=2, **kw).mode == "checkpoint"  # twice the activations
    tight = dict(kw, capacity_bytes=83 * GIB)
    assert memory.choose("auto", batch_size=1, **tight).mode == "resident"
    assert memory.choose("auto", batch_size=1, reduce_overhead=True, **tight).mode == "checkpoint"


def test_fixed_plans_and_cpu():
    for mode in ("resident", "checkpoint", "offload"):
        assert memory.choose(mode, weights_bytes=FULL_WEIGHTS, resolution=1024, batch_size=1, device=CUDA).mode == mode
    cpu = memory.choose("auto", weights_bytes=FULL_WEIGHTS, resolution=1024, batch_size=1, device=torch.device("cpu"))
    assert cpu.mode == "resident" and "cpu" in cpu.reason


def test_resolve_applies_the_plan_to_the_config():
    cfg = Config.from_dict({"model": {"memory": "auto", "compile": True, "compile_mode": "reduce-overhead"},
                            "train": {"resolution": 1024}})
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=78 * GIB)
    assert plan.mode == "checkpoint" and out.model.gradient_checkpointing and not out.model.offload
    # reduce-overhead CUDA graphs crash with checkpointing: auto falls back to the default compile mode
    assert out.model.compile and out.model.compile_mode is None
    assert out.model.memory == "checkpoint"
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=24 * GIB)
    assert plan.mode == "offload" and out.model.offload and not out.model.compile  # offload cannot be compiled
    # explicit settings are a floor: gradient_checkpointing: true never becomes resident
    cfg = Config.from_dict({"model": {"memory": "auto", "gradient_checkpointing": True}})
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=139 * GIB)
    assert plan.mode == "checkpoint" and out.model.gradient_checkpointing
    # manual keeps the settings exactly
    cfg = Config.from_dict({"model": {"memory": "manual"}})
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=24 * GIB)
    assert out is cfg and plan is None


@pytest.mark.parametrize("model, message", [
    ({"compile_mode": "reduce-overhead"}, "model.compile_mode is set but model.compile is false"),
    ({"compile": True, "compile_mode": "reduce-overhead", "gradient_checkpointing": True, "memory": "manual"},
     "reduce-overhead"),
    ({"compile": True, "compile_mode": "reduce-overhead", "memory": "checkpoint"}, "reduce-overhead"),
    ({"memory": "offload", "fp8_matmul": True}, "offload"),
    ({"memory": "offload", "compile": True}, "offload"),
    ({"quantize": True, "fp8_matmul": True}, "model.quantize"),
    ({"quantize": True, "offload": True}, "model.quantize"),
    ({"memory": "lots"}, "model.memory must be one of"),
])
def test_combinations_that_would_crash_are_refused_at_config_time(model, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"model": model})


def test_plan_respects_fp8_storage_and_the_device():
    cfg = Config.from_dict({"model": {"memory": "auto", "quantize": True}, "train": {"resolution": 1024}})
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=24 * GIB)
    assert plan.mode == "offload" and out.model.offload and not out.model.quantize  # offload stores fp8 itself
    for mode in ("checkpoint", "offload"):
        with pytest.raises(ConfigError, match=f"model.memory: {mode} plans GPU memory, but this run is on cpu"):
            memory.resolve(Config.from_dict({"model": {"memory": mode}}), FULL_WEIGHTS, torch.device("cpu"))


def test_blocks_to_checkpoint_recomputes_only_what_does_not_fit():
    """The ComfyUI node's per-block plan: none when every block's eager activations fit, all when not even the
    recomputed ones leave room, and in between just enough blocks to fit (scaled by image tokens and batch)."""
    from qwen_zero_prior.training.memory import ACT_CHECKPOINT_GIB, ACT_EAGER_GIB, GIB, blocks_to_checkpoint

    assert blocks_to_checkpoint(60, ACT_EAGER_GIB * GIB, 1024, 1) == 0
    assert blocks_to_checkpoint(60, 0, 1024, 1) == 60
    per_saved = (ACT_EAGER_GIB - ACT_CHECKPOINT_GIB) / 60
    k = blocks_to_checkpoint(60, (ACT_EAGER_GIB - 10) * GIB, 1024, 1)
    assert k == math.ceil(10 / per_saved)
    # what k blocks keep fits, k - 1 would not
    keep = lambda k: (ACT_EAGER_GIB - k * per_saved)  # noqa: E731
    assert keep(k) <= ACT_EAGER_GIB - 10 < keep(k - 1)
    # half the image tokens (724² ~ 1024²/2) need half the activations: 38 GiB available fits two samples at 724²
    assert blocks_to_checkpoint(60, ACT_EAGER_GIB * GIB, 724, 2) == 0
    assert blocks_to_checkpoint(60, ACT_EAGER_GIB * GIB, 1024, 2) > 0
