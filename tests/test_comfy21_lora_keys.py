"""A Qwen-Image 2.1 archive's LoRA keys are ones upstream ComfyUI's loader maps onto its 2.1 model.

No ComfyUI snapshot here has the 2.1 model (it arrived in ComfyUI 0.37; the newest here is 0.33), so this test
holds what upstream's files say as facts, each with its source, and checks every key of an archive the core
trains (all of 2.1's LoRA targets, txt_in included) against them: the key maps through ComfyUI's Qwen-Image LoRA
key map to a weight the 2.1 model defines, with the LoRA's shapes fitting that weight (or the half of the fused
MLP weight the map assigns). The sources were read from Comfy-Org/ComfyUI (GitHub) with the project's search
tool; re-read them when upstream changes these files.
"""

from __future__ import annotations

import pytest
import torch

from qwen_zero_prior.training.archive import load_archive
from qwen_zero_prior.training.data import scan_dataset
from qwen_zero_prior.training.trainer import Trainer

# ---- facts: upstream comfy/ldm/qwen_image21/model.py (Comfy-Org/ComfyUI @ 08f68f0919d2, unchanged @ b806797696c1)
# QwenImage21Transformer2DModel(in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
#   num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, ..., fused_mlp=True); inner_dim = heads * head_dim.
# Every Linear is operations.Linear(..., bias=False). (in_features, out_features) of each, by name:
#   txt_in = TextProjection: txt_in.in_layer (context_in_dim, inner), txt_in.out_layer (inner, inner)
#   img_in (in_channels, inner); modulation = nn.Sequential(nn.SiLU(), Linear(inner, 4 * inner)) -> modulation.1
#   norm_out = LastLayer: norm_out.linear (inner, inner); proj_out (inner, out_channels)
#   transformer_blocks.{i} = QwenImage21TransformerBlock:
#     attn.to_q / attn.to_k / attn.to_v (inner, inner); attn.to_out = nn.ModuleList([Linear(inner, inner)]) -> .0
#     img_mlp = SwiGLUFeedForward(inner, inner * mlp_ratio, fused=fused_mlp):
#       fused:   img_mlp.gate_up (inner, 2 * hidden)  "[gate; up] in one GEMM", out(swiglu(gate_up(x)))
#       unfused: img_mlp.proj (inner, hidden), img_mlp.gate_layer (inner, hidden), out(silu(gate_layer(x)) * proj(x))
#       img_mlp.out (hidden, inner)
# "swiglu" is comfy/ops.py _swiglu_eager: gate, up = x.chunk(2, dim=-1); silu(gate) * up (ComfyUI 0.33.0 here).
UPSTREAM_MODEL = "Comfy-Org/ComfyUI comfy/ldm/qwen_image21/model.py @ 08f68f0919d24164469557ca198b8e725c4fd237"


def upstream_linears(num_layers: int, inner: int, context_in_dim: int, mlp_ratio: int, in_channels: int = 64,
                     out_channels: int = 64, fused_mlp: bool = True) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every Linear of upstream's 2.1 model (the facts above)."""
    hidden = inner * mlp_ratio
    out = {"txt_in.in_layer": (context_in_dim, inner), "txt_in.out_layer": (inner, inner),
           "img_in": (in_channels, inner), "modulation.1": (inner, 4 * inner),
           "norm_out.linear": (inner, inner), "proj_out": (inner, out_channels)}
    for i in range(num_layers):
        b = f"transformer_blocks.{i}."
        out.update({b + n: (inner, inner) for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")})
        if fused_mlp:
            out[b + "img_mlp.gate_up"] = (inner, 2 * hidden)
        else:
            out[b + "img_mlp.proj"] = (inner, hidden)
            out[b + "img_mlp.gate_layer"] = (inner, hidden)
        out[b + "img_mlp.out"] = (hidden, inner)
    return out


# ---- facts: upstream comfy/lora.py (Comfy-Org/ComfyUI @ 17358c8f73b5), model_lora_keys_unet, branch
# `isinstance(model, comfy.model_base.QwenImage)` (2.1's model_base.QwenImage21 subclasses QwenImage): for each model
# weight k = "diffusion_model.{X}.weight", targets = [(X, k)]; if X ends with ".img_mlp.gate_up" ("Qwen Image 2.1
# fuses gate_layer/proj at load; LoRAs address the halves"), half = rows // 2 and targets =
# [(X with gate_layer, (k, (0, 0, half))), (X with proj, (k, (0, half, half)))]; each target's name is mapped as
# "{X}", "transformer.{X}" and "lycoris_{X with _}". A diffusers LoRA "{x}.lora_A.weight" / "{x}.lora_B.weight"
# loads onto key_map[x] (comfy/weight_adapter/lora.py: diffusers2_lora = "{}.lora_B.weight"). (dim, start, length)
# narrows the weight the LoRA's B @ A is added to.
UPSTREAM_LORA = "Comfy-Org/ComfyUI comfy/lora.py @ 17358c8f73b581a0d22facc3c385822f09b8bfb1"


def upstream_key_map(linears: dict[str, tuple[int, int]]) -> dict[str, tuple[str, tuple[int, int, int] | None]]:
    """LoRA module name -> (model weight, slice or None), as upstream's key map builds it (the facts above)."""
    key_map = {}
    for name, (_, rows) in linears.items():
        k = f"diffusion_model.{name}.weight"
        targets = [(name, (k, None))]
        if name.endswith(".img_mlp.gate_up"):
            half = rows // 2
            targets = [(name.replace(".gate_up", ".gate_layer"), (k, (0, 0, half))),
                       (name.replace(".gate_up", ".proj"), (k, (0, half, half)))]
        for key_lora, to in targets:
            key_map[key_lora] = to
            key_map[f"transformer.{key_lora}"] = to
            key_map["lycoris_{}".format(key_lora.replace(".", "_"))] = to
    return key_map


@pytest.fixture(scope="module")
def archive_21(_tiny_pipe_21_session, tmp_path_factory):
    """An archive the core trains on the tiny 2.1 (2 blocks, width 32, mlp_ratio 2) with every 2.1 LoRA target."""
    import copy

    from qwen_zero_prior.training.config import Config
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("lora21")
    data = make_synthetic_dataset(tmp / "data", n=2, size=32)
    cfg = Config.from_dict({"model": {"base_model": "tiny-2.1", "dtype": "float32", "device": "cpu"},
                            "train": {"train_placeholder_token": True, "rank": 4, "steps": 2, "resolution": 32,
                                      "checkpoint_every": 0, "lora_targets": "attention+mlp+txt_in"}})
    examples = scan_dataset(data, "<zwx>", "a photo of {token}", True)
    trainer = Trainer(cfg, copy.deepcopy(_tiny_pipe_21_session), examples, tmp)
    return load_archive(trainer.fit(tmp / "weights.zip").archive)


def test_tiny_21_matches_upstream_module_shapes(_tiny_pipe_21_session):
    """The diffusers model the core trains has each upstream LoRA-target Linear under the same name and shape
    (unfused MLP: diffusers keeps gate_layer and proj apart, as upstream's fused_mlp=False)."""
    tr = _tiny_pipe_21_session.transformer
    cfg = tr.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    facts = upstream_linears(cfg.num_layers, inner, cfg.context_in_dim, cfg.mlp_ratio, fused_mlp=False)
    mods = dict(tr.named_modules())
    targets = [n for n in facts if n.startswith(("transformer_blocks.", "txt_in."))]
    assert len(targets) == 2 + 7 * cfg.num_layers
    for name in targets:
        m = mods.get(name)
        assert isinstance(m, torch.nn.Linear), name
        assert (m.in_features, m.out_features) == facts[name] and m.bias is None, name


@pytest.mark.parametrize("fused_mlp", [True, False], ids=["fused-mlp (upstream default)", "unfused-mlp"])
def test_every_archive_lora_key_maps_onto_upstream_21_model(archive_21, _tiny_pipe_21_session, fused_mlp):
    cfg = _tiny_pipe_21_session.transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    linears = upstream_linears(cfg.num_layers, inner, cfg.context_in_dim, cfg.mlp_ratio, fused_mlp=fused_mlp)
    key_map = upstream_key_map(linears)
    weights = {f"diffusion_model.{n}.weight": shape for n, shape in linears.items()}
    sd = archive_21.lora_state_dict
    assert archive_21.meta.model_family == "qwen-image-2.1"
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    assert len(modules) == 2 + 7 * cfg.num_layers and len(sd) == 2 * len(modules)  # every 2.1 target, A and B
    assert set(sd) == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    covered = set()
    for module in modules:
        assert module in key_map, f"{module}: no upstream ComfyUI key map entry ({UPSTREAM_LORA}, {UPSTREAM_MODEL})"
        weight, narrow = key_map[module]
        in_f, out_f = weights[weight]
        a, b = sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"]
        rows = out_f if narrow is None else narrow[2]
        assert a.shape == (4, in_f) and b.shape == (rows, 4), (module, a.shape, b.shape, in_f, rows)
        covered.add((weight, narrow))
    assert len(covered) == len(modules)  # no two keys land on the same weight (or the same half of gate_up)
    if fused_mlp:
        # diffusers' gate_layer (SiLU's input) lands on gate_up's first half, which _swiglu_eager takes as the gate
        block = "transformer.transformer_blocks.0.img_mlp."
        assert key_map[block + "gate_layer"][1] == (0, 0, inner * cfg.mlp_ratio)
        assert key_map[block + "proj"][1] == (0, inner * cfg.mlp_ratio, inner * cfg.mlp_ratio)


def test_fused_swiglu_with_lora_halves_equals_diffusers_mlp(archive_21, _tiny_pipe_21_session):
    """Upstream's fused MLP (gate_up = [gate; up], out(silu(gate) * up)) with the archive's gate_layer / proj LoRA
    added to the halves the key map names computes diffusers' img_mlp with the LoRA fused: the halves mean what the
    LoRA was trained as."""
    import copy

    from qwen_zero_prior.training.lora import load_lora_into_pipeline

    pipe = copy.deepcopy(_tiny_pipe_21_session)
    g = torch.Generator().manual_seed(1)  # B well away from its zero init, so a swapped half shows
    sd = {k: (torch.randn(v.shape, generator=g) * 0.5 if ".lora_B." in k else v)
          for k, v in archive_21.lora_state_dict.items()}
    mlp = pipe.transformer.transformer_blocks[1].img_mlp
    gate_up = torch.cat([mlp.gate_layer.weight, mlp.proj.weight]).detach().clone()  # as upstream fuses at load
    out_w = mlp.out.weight.detach().clone()
    hidden = mlp.proj.out_features
    pre = "transformer.transformer_blocks.1.img_mlp."
    delta = {n: sd[pre + n + ".lora_B.weight"] @ sd[pre + n + ".lora_A.weight"] for n in ("gate_layer", "proj", "out")}
    gate_up[:hidden] += delta["gate_layer"]  # (0, 0, half)
    gate_up[hidden:] += delta["proj"]  # (0, half, half)
    x = torch.randn(3, 5, gate_up.shape[1], generator=torch.Generator().manual_seed(0))

    def fused_mlp(w):
        gate, up = (x @ w.t()).chunk(2, dim=-1)  # _swiglu_eager
        return (torch.nn.functional.silu(gate) * up) @ (out_w + delta["out"]).t()

    comfy_like = fused_mlp(gate_up)
    swapped = fused_mlp(torch.cat([gate_up[hidden:], gate_up[:hidden]]))

    assert load_lora_into_pipeline(pipe, sd) == {"missing": [], "unexpected": []}
    with torch.no_grad():
        want = pipe.transformer.transformer_blocks[1].img_mlp(x)
    torch.testing.assert_close(comfy_like, want, rtol=1e-4, atol=1e-4)  # summation order: B(Ax) vs (W + BA)x
    assert (swapped - want).abs().max() > 0.1  # the other assignment of the halves would not be the same MLP
