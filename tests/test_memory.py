"""``model.memory``: the plan is chosen from the memory this process may use, and no allowed setting crashes."""

import math
import types

import pytest
import torch

from qwen_zero_prior.training import memory
from qwen_zero_prior.training.config import Config, ConfigError

GIB = 2**30
FULL_WEIGHTS = int(54.0 * GIB)  # Qwen-Image bf16: 20.4B DiT + Qwen2.5-VL-7B (with its vision tower) + VAE
CUDA = torch.device("cuda", 0)

# Qwen-Image's real sizes (parameter counts of diffusers' QwenImageTransformer2DModel() defaults, the 7B
# Qwen2.5-VL text encoder with its vision tower, and AutoencoderKLQwenImage())
DIT_PARAMS, TE_PARAMS, VAE_PARAMS = 20_430_401_088, 8_292_166_656, 126_892_531
BLOCKS, DIM, MLP = 60, 3072, 12288
# the image stream fp8_matmul converts: to_q/k/v/out (DIM x DIM) and the MLP's two (DIM <-> MLP) in each block
IMAGE_STREAM_VALUES = BLOCKS * (4 * DIM * DIM + 2 * DIM * MLP)  # 6.8B
IMAGE_STREAM_ROWS = BLOCKS * (4 * DIM + MLP + DIM)  # one float32 scale per output row
BF16_WEIGHTS = 2 * (DIT_PARAMS + TE_PARAMS + VAE_PARAMS)  # 53.7 GiB
# one e4m3 copy (+ row scales) of the image stream instead of its bf16 weights; the rest stays bf16
FP8_MATMUL_WEIGHTS = BF16_WEIGHTS - 2 * IMAGE_STREAM_VALUES + IMAGE_STREAM_VALUES + 4 * IMAGE_STREAM_ROWS


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
    # reduce-overhead: the compiled step's measured activations, plus the graphs' own pools
    ro = memory.choose("auto", batch_size=1, reduce_overhead=True, **tight)
    eager = memory.choose("auto", batch_size=1, **tight)
    assert ro.need_gib["resident"] == round(54.0 + 19.5 + 4.0 + 3.5, 1) == 81.0
    assert eager.need_gib["resident"] == round(54.0 + 24.0 + 4.0, 1) == 82.0
    assert memory.choose("auto", batch_size=1, reduce_overhead=True, **dict(kw, capacity_bytes=80 * GIB)).mode \
        == "checkpoint"


def test_fp8_matmul_reduce_overhead_plans_resident_on_an_80gb_card():
    """The fastest setting (fp8_matmul, compile reduce-overhead, 1024², batch 1) on an 80 GB card (78 GiB for the
    process): with one fp8 copy of the image stream the weights are 47.4 GiB and the plan (~74.4 GiB) fits; with
    bf16-sized weights (as before, or without fp8_matmul) it does not (~80.7 GiB: that step OOMed under 78 GiB)."""
    assert round(BF16_WEIGHTS / GIB, 1) == 53.7 and round(FP8_MATMUL_WEIGHTS / GIB, 1) == 47.4
    assert round((BF16_WEIGHTS - FP8_MATMUL_WEIGHTS) / GIB, 2) == 6.32  # what the one-copy storage frees
    kw = dict(resolution=1024, batch_size=1, device=CUDA, reduce_overhead=True, capacity_bytes=78 * GIB)
    plan = memory.choose("auto", weights_bytes=FP8_MATMUL_WEIGHTS, **kw)
    assert plan.mode == "resident" and plan.need_gib["resident"] == 74.4 and plan.weights_gib == 47.4, plan
    assert "resident: needs ~74.4 GiB (47.4 GiB weights" in plan.reason
    plan = memory.choose("auto", weights_bytes=BF16_WEIGHTS, **kw)
    assert plan.mode == "checkpoint" and plan.need_gib["resident"] == 80.7, plan

    model = {"memory": "auto", "compile": True, "compile_mode": "reduce-overhead", "fp8_matmul": True}
    cfg = Config.from_dict({"model": model, "train": {"resolution": 1024, "batch_size": 1}})
    out, plan = memory.resolve(cfg, FP8_MATMUL_WEIGHTS, CUDA, capacity_bytes=78 * GIB)
    assert plan.mode == "resident" and out.model.memory == "resident"
    assert not out.model.gradient_checkpointing and out.model.compile_mode == "reduce-overhead"
    assert out.model.fp8_matmul and out.model.compile
    # auto never turns fp8_matmul on by itself: without it the same card checkpoints in the default compile mode
    cfg = cfg.replace(model={"fp8_matmul": False})
    out, plan = memory.resolve(cfg, BF16_WEIGHTS, CUDA, capacity_bytes=78 * GIB)
    assert plan.mode == "checkpoint" and not out.model.fp8_matmul and out.model.compile_mode is None


@pytest.mark.parametrize("model, fp8_bytes", [({}, False), ({"fp8_matmul": True}, True), ({"quantize": True}, None)])
def test_weights_bytes_counts_fp8_storage_as_placed(tiny_pipe, model, fp8_bytes):
    """What the plan counts for the loaded models: bf16/fp32 as loaded, fp8_matmul's image stream as one fp8 copy
    + row scales (exactly what the conversion leaves), quantize's transformer one byte a value; never the text
    encoder's vision tower and LM head, which training leaves in CPU memory (text_parts.park) — counted the same
    before and after they are parked."""
    from qwen_zero_prior.training import text_parts
    from qwen_zero_prior.training.fp8 import Fp8Linear, apply_fp8_matmul

    m = Config.from_dict({"model": model}).model
    te = tiny_pipe.text_encoder
    assert te.lm_head.weight is not te.get_input_embeddings().weight  # untied: the head counts as unused
    unused = memory.module_bytes(te.model.visual, te.lm_head)
    assert unused > 0
    parts = (tiny_pipe.transformer, te, tiny_pipe.vae)
    loaded = memory.module_bytes(*parts) - unused
    counted = memory.weights_bytes(tiny_pipe, m)
    text_parts.park(te)
    assert memory.weights_bytes(tiny_pipe, m) == counted
    if fp8_bytes is None:
        tr = tiny_pipe.transformer
        assert counted == loaded - memory.module_bytes(tr) + memory.module_bytes(tr) // tr.dtype.itemsize
        return
    if fp8_bytes:
        assert apply_fp8_matmul(tiny_pipe.transformer) > 0
    fp8_layers = [mod for mod in tiny_pipe.transformer.modules() if isinstance(mod, Fp8Linear)]
    placed = memory.module_bytes(*parts) - memory.module_bytes(te.model.visual) + sum(
        b.numel() * b.element_size() for mod in fp8_layers for b in mod.buffers())  # the fp8 copies are buffers
    assert counted == placed and (counted < loaded) == fp8_bytes


def test_fixed_plans_and_cpu():
    for mode in ("resident", "checkpoint", "offload"):
        assert memory.choose(mode, weights_bytes=FULL_WEIGHTS, resolution=1024, batch_size=1, device=CUDA).mode == mode
    cpu = memory.choose("auto", weights_bytes=FULL_WEIGHTS, resolution=1024, batch_size=1, device=torch.device("cpu"))
    assert cpu.mode == "resident" and "cpu" in cpu.reason


def test_max_autotune_is_planned_as_the_cuda_graphs_it_captures(monkeypatch):
    """compile_mode max-autotune turns on the same CUDA-graph trees as reduce-overhead: the plan counts their pools and
    the compiled step's activations for both (before, max-autotune was planned as an eager step without pools), and the
    trainer marks each step for both (else the trees cannot tell a new step from a re-run)."""
    from qwen_zero_prior.training.diffusers_backend import DiffusersBackend

    def planned(mode):
        cfg = Config.from_dict({"model": {"memory": "auto", "compile": True, "compile_mode": mode, "fp8_matmul": True},
                                "train": {"resolution": 1024, "batch_size": 1}})
        assert cfg.model.compile_graphs == (mode in ("reduce-overhead", "max-autotune")), mode
        return cfg, memory.resolve(cfg, FP8_MATMUL_WEIGHTS, CUDA, capacity_bytes=78 * GIB)[1]

    from qwen_zero_prior.training.config import GRAPH_COMPILE_MODES

    assert set(GRAPH_COMPILE_MODES) == set(memory.GRAPH_MODES)  # the two lists of graph modes agree
    graphs = planned("reduce-overhead")[1].need_gib["resident"]
    assert planned("max-autotune")[1].need_gib["resident"] == graphs
    assert planned("max-autotune-no-cudagraphs")[1].need_gib["resident"] != graphs
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, marked in (("max-autotune", 1), ("reduce-overhead", 1), ("max-autotune-no-cudagraphs", 0), (None, 0)):
        marks.clear()
        DiffusersBackend.step_begin(types.SimpleNamespace(_prefetcher=None, cfg=planned(mode)[0]))
        assert len(marks) == marked, mode


def test_resolve_applies_the_plan_to_the_config():
    cfg = Config.from_dict({"model": {"memory": "auto", "compile": True, "compile_mode": "reduce-overhead"},
                            "train": {"resolution": 1024}})
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=78 * GIB)
    assert plan.mode == "checkpoint" and out.model.gradient_checkpointing and not out.model.offload
    # reduce-overhead CUDA graphs crash with checkpointing: auto falls back to the default compile mode
    assert out.model.compile and out.model.compile_mode is None
    assert out.model.memory == "checkpoint"
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=24 * GIB)
    # offload compiles every block (the streamed ones too), in the default mode (it recomputes blocks)
    assert plan.mode == "offload" and out.model.offload and out.model.compile and out.model.compile_mode is None
    # max-autotune captures CUDA graphs too: where auto checkpoints or offloads, it keeps autotuning without them
    tuned = Config.from_dict({"model": {"memory": "auto", "compile": True, "compile_mode": "max-autotune"},
                              "train": {"resolution": 1024}})
    for capacity, mode in ((78, "checkpoint"), (24, "offload")):
        out, plan = memory.resolve(tuned, FULL_WEIGHTS, CUDA, capacity_bytes=capacity * GIB)
        assert plan.mode == mode and out.model.compile_mode == "max-autotune-no-cudagraphs"
    # explicit settings are a floor: gradient_checkpointing: true never becomes resident
    cfg = Config.from_dict({"model": {"memory": "auto", "gradient_checkpointing": True}})
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=139 * GIB)
    assert plan.mode == "checkpoint" and out.model.gradient_checkpointing
    # manual keeps the settings exactly
    cfg = Config.from_dict({"model": {"memory": "manual"}})
    out, plan = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=24 * GIB)
    assert out is cfg and plan is None


def test_cuda_graphs_are_dropped_under_the_cudamallocasync_allocator(monkeypatch, caplog):
    """PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (ComfyUI's default): capture failed and the process aborted on
    an H200, so the CLI/Cog drop reduce-overhead and the text encoder's graphs, saying so and how to get them back;
    the native allocator, a CPU, and a config without graphs are left alone."""
    import logging

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config.from_dict({"model": {"compile": True, "compile_mode": "reduce-overhead", "text_cuda_graphs": True}})
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert memory.without_blocked_graphs(cfg, CUDA) is cfg
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert memory.without_blocked_graphs(cfg, torch.device("cpu")) is cfg
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior.training.memory"):
        out = memory.without_blocked_graphs(cfg, CUDA)
    assert out.model.compile and out.model.compile_mode is None and out.model.text_cuda_graphs is False
    assert "cudaMallocAsync" in caplog.text and "PYTORCH_CUDA_ALLOC_CONF" in caplog.text
    assert "model.text_cuda_graphs -> false" in caplog.text
    plain = Config.from_dict({"model": {"text_cuda_graphs": False}})
    assert memory.without_blocked_graphs(plain, CUDA) is plain
    tuned = Config.from_dict({"model": {"compile": True, "compile_mode": "max-autotune", "text_cuda_graphs": False}})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior.training.memory"):
        out = memory.without_blocked_graphs(tuned, CUDA)  # max-autotune captures CUDA graphs too
    assert out.model.compile_mode == "max-autotune-no-cudagraphs"
    assert "model.compile_mode max-autotune -> max-autotune-no-cudagraphs" in caplog.text


@pytest.mark.parametrize("model, message", [
    ({"compile_mode": "reduce-overhead"}, "model.compile_mode is set but model.compile is false"),
    ({"compile": True, "compile_mode": "reduce-overhead", "gradient_checkpointing": True, "memory": "manual"},
     "reduce-overhead"),
    ({"compile": True, "compile_mode": "reduce-overhead", "memory": "checkpoint"}, "reduce-overhead"),
    ({"memory": "offload", "fp8_matmul": True}, "offload"),
    ({"memory": "offload", "compile": True, "compile_mode": "reduce-overhead"}, "reduce-overhead"),
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


# ---- Qwen-Image 2.1: the plan counts what fp8 storage keeps on the GPU ------------------------------------


@pytest.fixture(scope="module")
def parts_21():
    """The full-size 2.1 pipeline's weights by part, built on the meta device (no memory, no init time)."""
    from bench.bench_step import build_pipeline_21

    pipe, _ = build_pipeline_21("full", torch.device("meta"), torch.bfloat16)
    return memory.weight_parts(pipe)


def test_2_1_full_size_bytes(parts_21):
    """diffusers 0.42's QwenImage21Transformer2DModel defaults and Qwen3-VL-8B (8.77B parameters)."""
    p = parts_21
    assert p.family == "qwen-image-2.1"
    assert p.dit_blocks == 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 12288)  # 7 bias-free Linears per block
    assert p.te_layers == 2 * 36 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288)  # GQA: 8 kv heads
    assert p.dit_blocks_fp8 == p.dit_blocks // 2 + 4 * 32 * (4 * 4096 + 2 * 12288 + 4096)  # + a scale per row
    assert (p.te_rest + p.te_unused + p.te_layers) // 2 == 8_767_123_696
    assert 30.0 < p.total / GIB < 30.5


def test_2_1_offload_plan_turns_compile_off(parts_21):
    """Qwen-Image 2.1's offloaded step was measured eager only: its offload plan turns compile off (Qwen-Image's
    keeps it, test_resolve_applies_the_plan_to_the_config)."""
    cfg = Config.from_dict({"model": {"memory": "auto", "compile": True}, "train": {"resolution": 1024}})
    out, plan = memory.resolve(cfg, parts_21.total, CUDA, capacity_bytes=24 * GIB, parts=parts_21)
    assert plan.mode == "offload" and out.model.offload and not out.model.compile


@pytest.mark.parametrize("cap_gib, expected, te", [
    (139.8, "resident", None),   # an H200
    (40.0, "checkpoint", None),  # 30.2 GiB of bf16 weights + checkpointed activations
    (32.0, "offload", "bf16"),   # fp8 transformer blocks; the text decoder fits as loaded beside them
    (24.0, "offload", "fp8"),    # a 24 GB card: both in fp8, everything on the GPU
    (16.0, "offload", "stream"),  # even fp8 does not fit: the text decoder's layers are streamed
])
def test_2_1_plan_keeps_weights_on_the_gpu_where_fp8_fits(parts_21, cap_gib, expected, te):
    plan = memory.choose("auto", weights_bytes=parts_21.total, resolution=1024, batch_size=1, device=CUDA,
                         capacity_bytes=cap_gib * GIB, parts=parts_21)
    assert plan.mode == expected, plan
    assert "Qwen-Image 2.1" in plan.reason and f"{cap_gib:.1f} GiB" in plan.reason
    if te is None:
        assert plan.layout is None
        return
    assert plan.layout["text_encoder_layers"] == te and plan.layout["streamed"] == (te == "stream")
    if te == "stream":
        assert "streamed from CPU memory" in plan.reason
    else:
        assert plan.reason.endswith("all on the GPU: nothing streamed from CPU memory")
        gpu = memory.offload_gpu_bytes(parts_21, te) / GIB
        assert plan.layout["gpu_weights_gib"] == round(gpu, 1)
        assert gpu + memory.OFFLOAD_RESERVE_GIB <= cap_gib  # weights + the reserve for activations/LoRA fit
    if te == "fp8":  # ~15 GiB of weights: DiT blocks 6.5 + text decoder 6.5 + embeddings, norms, VAE
        assert 14.5 < plan.layout["gpu_weights_gib"] < 15.5
        assert "bf16 (12.9 GiB) does not fit" in plan.reason


def test_2_1_resolve_logs_the_plan_and_budgets_offload_by_the_capacity(parts_21, caplog):
    import logging

    cfg = Config.from_dict({"model": {"memory": "auto"}, "train": {"resolution": 1024}})
    caplog.set_level(logging.INFO, logger="qwen_zero_prior")
    out, plan = memory.resolve(cfg, parts_21.total, CUDA, capacity_bytes=24 * GIB, parts=parts_21)
    assert plan.mode == "offload" and out.model.offload and out.model.gradient_checkpointing
    # offload places weights by its budget: the capacity planned for, not the card's total memory
    assert out.model.offload_budget_gib == 24.0
    assert "text decoder's layers in fp8" in caplog.text and "nothing streamed" in caplog.text
    # Qwen-Image's plans are unchanged without parts
    qi, _ = memory.resolve(cfg, FULL_WEIGHTS, CUDA, capacity_bytes=24 * GIB)
    assert qi.model.offload and qi.model.offload_budget_gib == 24.0
    fixed = Config.from_dict({"model": {"memory": "auto", "offload_budget_gib": 20}})
    assert memory.resolve(fixed, parts_21.total, CUDA, capacity_bytes=24 * GIB, parts=parts_21)[0] \
        .model.offload_budget_gib == 20


@pytest.fixture(scope="module")
def parts_qwen_image():
    """The full-size Qwen-Image pipeline's weights by part, built on the meta device."""
    from bench.bench_step import build_pipeline

    pipe, _ = build_pipeline("full", torch.device("meta"), torch.bfloat16)
    return memory.weight_parts(pipe)


@pytest.mark.parametrize("budget_gib, ring_gib, fetch, expected", [
    (24.0, 2.0, True, "bf16"),     # a 24 GB card, the default ring: 913 vs 1058 ms/step streamed (session 23)
    (24.0, 1.0, True, "bf16"),
    (23.0, 2.0, True, "bf16"),     # 12.15 GiB of decoder layers still fit beside 7.5 + 2 + 1.1 GiB
    (22.0, 2.0, True, "stream"),   # they do not: streamed as loaded
    (24.0, 4.0, True, "stream"),   # a larger ring leaves them no room
    (24.0, 0.0, True, "stream"),   # no ring: the blocks would be copied at use, not fetched as one
    (24.0, 0.25, True, "stream"),  # a ring smaller than a block (0.32 GiB): fetched layer by layer
    (24.0, 2.0, False, "stream"),  # QWEN_ZERO_PRIOR_BLOCK_FETCH=0: layer by layer too (not faster, session 21)
    (16.0, 2.0, True, "stream"),
    (80.0, 0.0, False, "bf16"),    # every block fits beside the decoder: nothing streams, no ring needed
])
def test_qwen_image_offload_keeps_the_text_decoder_on_the_gpu_where_it_fits_beside_the_ring(
        parts_qwen_image, budget_gib, ring_gib, fetch, expected):
    """model.offload_text_encoder: auto for Qwen-Image: the decoder's layers as loaded on the GPU where they fit
    beside the offload reserve (compile's included), the other GPU-resident weights and, where blocks stream, a
    prefetch ring that fetches a block as one; never fp8 (the conditioning stays exact)."""
    p = parts_qwen_image
    assert p.family == "qwen-image" and 12.1 < p.te_layers / GIB < 12.2
    block = p.dit_blocks_fp8 / 60 if fetch else math.inf
    assert 0.31 < p.dit_blocks_fp8 / 60 / GIB < 0.33
    reserve = (memory.OFFLOAD_RESERVE_GIB + memory.OFFLOAD_COMPILE_RESERVE_GIB) * GIB
    assert memory.text_encoder_storage(p, budget_gib * GIB, reserve, ring_gib * GIB, block) == expected


def test_apply_offload_refuses_an_unknown_text_encoder_storage():
    from qwen_zero_prior.training.offload import apply_offload

    with pytest.raises(ValueError, match=r"^apply_offload: text_encoder must be stream, stream_fp8, bf16, fp8 or auto, got 'gpu'$"):
        apply_offload(None, torch.device("cpu"), 24.0, text_encoder="gpu")


# ---- placing the weights: fp8_matmul converts its layers on the GPU, after they arrive in bf16 -------------------


@pytest.fixture(scope="module")
def meta_pipes():
    """Both families' full-size pipelines on the meta device (shapes only)."""
    from bench.bench_step import build_pipeline, build_pipeline_21

    return {name: build("full", torch.device("meta"), torch.bfloat16)[0]
            for name, build in (("qwen-image", build_pipeline), ("qwen-image-2.1", build_pipeline_21))}


def test_placing_counts_fp8_matmul_layers_as_loaded(meta_pipes):
    """``weights_bytes(placing=True)``: what the GPU holds while the pipeline is placed, before the trainer converts
    fp8_matmul's layers: their bf16 bytes (the same as without fp8_matmul); the vision tower and LM head in neither."""
    from qwen_zero_prior.training.config import ModelConfig

    pipe = meta_pipes["qwen-image"]
    fp8, bf16 = ModelConfig(fp8_matmul=True), ModelConfig()
    assert round(memory.weights_bytes(pipe, fp8) / GIB, 1) == 45.1
    assert memory.weights_bytes(pipe, fp8, placing=True) == memory.weights_bytes(pipe, bf16) \
        == memory.weights_bytes(pipe, bf16, placing=True)
    assert round(memory.weights_bytes(pipe, bf16) / GIB, 1) == 51.5  # 53.7 less the 2.3 GiB left in CPU memory
    # quantize converts on the CPU before the move: placing counts it converted
    q = ModelConfig(quantize=True)
    assert memory.weights_bytes(pipe, q, placing=True) == memory.weights_bytes(pipe, q) < memory.weights_bytes(pipe, bf16)


@pytest.mark.parametrize("family, cap_gib, without_load, with_load", [
    # Qwen-Image, fp8_matmul: checkpointing needs ~50.6 GiB with the weights in fp8, placing them ~52.5
    ("qwen-image", 52.0, "checkpoint", "offload"),
    ("qwen-image", 53.0, "checkpoint", "checkpoint"),
    ("qwen-image", 78.0, "resident", "resident"),  # an 80 GB card: placing (52.5) is far below the step's need
    # Qwen-Image 2.1, fp8_matmul (e.g. a 32 GB card with a display on it): checkpoint ~27.5, placing ~29.0
    ("qwen-image-2.1", 28.5, "checkpoint", "offload"),
    ("qwen-image-2.1", 30.0, "checkpoint", "checkpoint"),
])
def test_a_plan_fits_only_where_placing_the_weights_fits(meta_pipes, family, cap_gib, without_load, with_load):
    """Between what the step needs with fp8_matmul's weights and what placing them takes, resident or checkpoint
    would run out of memory before the first step: the plan offloads there and says why."""
    from qwen_zero_prior.training.config import ModelConfig

    pipe, m = meta_pipes[family], ModelConfig(fp8_matmul=True)
    parts = memory.weight_parts(pipe) if family != "qwen-image" else None
    kw = dict(weights_bytes=memory.weights_bytes(pipe, m), resolution=1024, batch_size=1, device=CUDA,
              capacity_bytes=cap_gib * GIB, parts=parts, reduce_overhead=True)
    assert memory.choose("auto", **kw).mode == without_load
    plan = memory.choose("auto", load_bytes=memory.weights_bytes(pipe, m, placing=True), **kw)
    assert plan.mode == with_load, plan
    assert plan.need_gib["load"] > plan.need_gib["checkpoint"]
    if with_load != without_load:
        assert plan.need_gib["load"] > cap_gib
        assert (f"checkpointing would need ~{plan.need_gib['checkpoint']} GiB once model.fp8_matmul has stored its "
                f"layers in fp8, but placing the weights before that needs ~{plan.need_gib['load']} GiB, more than "
                f"the {cap_gib:.1f} GiB available") in plan.reason


def test_resolve_takes_the_load_into_account(meta_pipes):
    """``resolve`` passes ``load_bytes`` to the plan; the offload it falls back to turns fp8_matmul off (offload
    stores the transformer in fp8 itself)."""
    from qwen_zero_prior.training.config import ModelConfig

    pipe = meta_pipes["qwen-image"]
    cfg = Config.from_dict({"model": {"memory": "auto", "fp8_matmul": True}, "train": {"resolution": 1024}})
    weights = memory.weights_bytes(pipe, cfg.model)
    load = memory.weights_bytes(pipe, cfg.model, placing=True)
    assert memory.resolve(cfg, weights, CUDA, capacity_bytes=52 * GIB)[1].mode == "checkpoint"
    out, plan = memory.resolve(cfg, weights, CUDA, capacity_bytes=52 * GIB, load_bytes=load)
    assert plan.mode == "offload" and out.model.offload and not out.model.fp8_matmul
    # without fp8_matmul placing takes what the step keeps: the load never decides a plan
    plain = ModelConfig()
    w = memory.weights_bytes(pipe, plain)
    for cap in (24, 44, 52, 56, 60, 78, 100, 139):
        kw = dict(weights_bytes=w, resolution=1024, batch_size=1, device=CUDA, capacity_bytes=cap * GIB)
        assert memory.choose("auto", **kw).mode == memory.choose(
            "auto", load_bytes=memory.weights_bytes(pipe, plain, placing=True), **kw).mode
