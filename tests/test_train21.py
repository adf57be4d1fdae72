"""Qwen-Image 2.1 through the one training loop (``Trainer`` over ``Diffusers21Backend``) and the CLI, on tiny
random models of the real classes: only the token's row moves, the loop's loss is flow21's (the pipeline's
numbers), the archive loads in QwenImage21Pipeline.load_lora_weights with no unexpected keys, train -> predict
end to end, and the family is picked from the folder (or named, or refused when it contradicts the folder)."""

from __future__ import annotations

import copy
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_zero_prior.training import flow21, text_parts
from qwen_zero_prior.training.archive import load_archive
from qwen_zero_prior.training.config import ConfigError
from qwen_zero_prior.training.data import load_pixels, scan_dataset
from qwen_zero_prior.training.token import materialize
from qwen_zero_prior.training.trainer import Trainer

TARGETS_21 = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
              "img_mlp.out"]


def _examples(dataset_dir):
    return scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)


def test_backend_is_picked_by_family(tiny_pipe, tiny_pipe_21, dataset_dir, make_config, tmp_path):
    from qwen_zero_prior.training.diffusers21_backend import Diffusers21Backend
    from qwen_zero_prior.training.diffusers_backend import DiffusersBackend

    t21 = Trainer(make_config(steps=1), tiny_pipe_21, _examples(dataset_dir), tmp_path / "a")
    assert type(t21.backend) is Diffusers21Backend and t21.backend.model_family == "qwen-image-2.1"
    assert t21.backend.bucket_step == 32 and t21.backend.lora_targets() == TARGETS_21
    tqi = Trainer(make_config(steps=1), tiny_pipe, _examples(dataset_dir), tmp_path / "b")
    assert type(tqi.backend) is DiffusersBackend and tqi.backend.model_family == "qwen-image"
    # the loop's noise levels are 2.1's scheduler training grid, as diffusers' 2.1 script samples them
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(tiny_pipe_21.scheduler.config)
    assert torch.equal(t21.sigmas, sched.sigmas[:1000].float()) and len(t21.sigmas) == 1000


def test_compile_routes_the_real_rope_of_both_families(tiny_pipe_21, dataset_dir, make_config, tmp_path):
    """model.compile: both families' RoPE runs in real arithmetic (training/rope.py), with torch 2.11's inductor
    CantSplit bug worked around (compile_fixes.py), which 2.1's joint sequence met in the CUDA backward."""
    from diffusers.models.transformers import transformer_qwenimage as qi
    from diffusers.models.transformers import transformer_qwenimage21 as q21
    from torch._inductor.codegen.simd import CantSplit

    from qwen_zero_prior.training import rope

    rope.uninstall()  # diffusers' own functions, whatever an earlier test left
    original_21, original_qi = q21.apply_rotary_emb_qwen, qi.apply_rotary_emb_qwen
    cfg = make_config(steps=1)
    Trainer(cfg, copy.deepcopy(tiny_pipe_21), _examples(dataset_dir), tmp_path / "eager")
    assert (q21.apply_rotary_emb_qwen, qi.apply_rotary_emb_qwen) == (original_21, original_qi)  # eager: untouched
    cfg.model.compile = True
    try:
        Trainer(cfg, tiny_pipe_21, _examples(dataset_dir), tmp_path / "a")
        assert q21.apply_rotary_emb_qwen is rope.apply_rotary_emb_qwen_real
        assert qi.apply_rotary_emb_qwen is rope.apply_rotary_emb_qwen_real
        with pytest.raises(CantSplit):  # the bare raise of torch 2.11 is a CantSplit again, not a TypeError
            raise CantSplit
    finally:
        rope.uninstall()


def test_attention_backend_reaches_the_image_queries(tiny_pipe_21, monkeypatch):
    """diffusers' 2.1 processor sends no prefill call to ``set_attention_backend``'s backend; attention21's sends the
    image's (unmasked) call there and keeps the caption's masked calls on diffusers' default, with the same numbers
    and gradients; with a padding mask the image call stays on the default too."""
    from diffusers.models.transformers import transformer_qwenimage21 as q21

    from qwen_zero_prior.training import attention21

    tr = tiny_pipe_21.transformer
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, tiny_pipe_21.vae.config.z_dim, 1, 4, 4, generator=g)
    embeds = torch.randn(2, 5, tr.config.context_in_dim, generator=g, requires_grad=True)
    calls = []
    dispatch = q21.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, backend=None, **kw):
        calls.append((query.shape[1], None if backend is None else str(getattr(backend, "value", backend)),
                      attn_mask is not None))
        return dispatch(query, key, value, attn_mask=attn_mask, backend=backend, **kw)

    monkeypatch.setattr(q21, "dispatch_attention_fn", spy)
    outs = []
    for patched in (False, True):
        if patched:
            assert attention21.install(tr, "_native_math") == len(tr.transformer_blocks)
        embeds.grad = None
        calls.clear()
        out = flow21.forward(tr, noisy, torch.tensor([0.5, 0.7]), embeds, None)
        out.square().sum().backward()
        outs.append((out.detach(), embeds.grad.clone(), list(calls)))
    (ref, ref_grad, ref_calls), (got, got_grad, got_calls) = outs
    n = len(tr.transformer_blocks)
    assert ref_calls == [(5, None, True), (16, None, False)] * n  # diffusers: caption (masked), image, both default
    assert got_calls == [(5, None, True), (16, "_native_math", False)] * n
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(got_grad, ref_grad, atol=1e-5)
    calls.clear()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    flow21.forward(tr, noisy, torch.tensor([0.5, 0.7]), embeds, mask)
    assert {c[1] for c in calls} == {None}  # padded keys: the image call keeps its mask on the default


def test_trainer_puts_the_2_1_processor_on_with_an_attention_backend(tiny_pipe_21, dataset_dir, make_config,
                                                                    tmp_path):
    cfg = make_config(steps=1)
    cfg.model.attention_backend = "_native_math"
    t = Trainer(cfg, tiny_pipe_21, _examples(dataset_dir), tmp_path)
    procs = {type(b.attn.processor).__name__ for b in tiny_pipe_21.transformer.transformer_blocks}
    assert procs == {"Segments21AttnProcessor"}
    assert {str(b.attn.processor._attention_backend.value) for b in tiny_pipe_21.transformer.transformer_blocks} == {
        "_native_math"}
    assert np.isfinite(t.train_step()) and np.isfinite(t.train_step())
    assert t.backend.layouts.misses == 1  # the step's transformer call is forward_t2i's, its layout built once


@pytest.mark.parametrize("products", [False, True, "delta"], ids=["default", "lora_product", "lora_delta"])
def test_shared_input_lora_equals_peft_and_fuses_the_a_products(tiny_pipe_21, products, monkeypatch):
    """lora_shared: q/k/v (in attention21's processor) and gate/proj (the SwiGLU) run their LoRA A products as one
    matmul each, with peft's numbers: the same output, the same gradients for the input and every lora_A/lora_B,
    and no lora_A module called on its own for the five fused layers of each block (with
    ``lora_shared.FLOAT32_WEIGHT_GRADS`` or ``FUSED_DELTA``, alpha 8 there, for to_out.0 and img_mlp.out either)."""
    from qwen_zero_prior.training import attention21, lora_shared
    from qwen_zero_prior.training.lora import add_lora

    monkeypatch.setattr(lora_shared, "FLOAT32_WEIGHT_GRADS", products is True)
    monkeypatch.setattr(lora_shared, "FUSED_DELTA", products == "delta")

    tr = tiny_pipe_21.transformer
    add_lora(tr, rank=4, alpha=8 if products == "delta" else 4, targets=TARGETS_21, seed=0)
    g = torch.Generator().manual_seed(1)
    for name, p in tr.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give every adapter a visible contribution
            p.data = torch.randn(p.shape, generator=g) * 0.5
    noisy = torch.randn(2, tiny_pipe_21.vae.config.z_dim, 1, 4, 4, generator=g)
    embeds = torch.randn(2, 5, tr.config.context_in_dim, generator=g, requires_grad=True)
    lora = {n: p for n, p in tr.named_parameters() if "lora_" in n}
    called = []
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: called.append(n.split(".lora_A")[0]))
             for n, m in tr.named_modules() if ".lora_A." in n]
    runs = []
    for fused in (False, True):
        if fused:
            assert attention21.install(tr, None) == len(tr.transformer_blocks)
            assert lora_shared.install_swiglu(tr) == len(tr.transformer_blocks)
        embeds.grad = None
        for p in lora.values():
            p.grad = None
        called.clear()
        out = flow21.forward(tr, noisy, torch.tensor([0.5, 0.7]), embeds, None)
        out.square().sum().backward()
        runs.append((out.detach(), embeds.grad.clone(), {n: p.grad.clone() for n, p in lora.items()},
                     sorted(set(called))))
    for h in hooks:
        h.remove()
    (ref, ref_dx, ref_grads, ref_called), (got, got_dx, got_grads, got_called) = runs
    # float32 rounding of other summation orders (addmm's: ~1e-6 of the largest entry, the scaling 2 in it)
    tol = {"rtol": 1e-5, "atol": 1e-5 if products == "delta" else 1e-6}
    assert torch.allclose(got, ref, **tol) and torch.allclose(got_dx, ref_dx, **tol)
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) == 2 * 7 * len(tr.transformer_blocks)
    for n in ref_grads:
        # fp32 rounding of other summation orders only: ~5e-7 of each gradient's largest entry here
        assert (got_grads[n] - ref_grads[n]).abs().max() <= 1e-5 * ref_grads[n].abs().max(), n
        assert got_grads[n].abs().sum() > 0, n
    n_blocks = len(tr.transformer_blocks)
    assert len(ref_called) == 7 * n_blocks  # peft: every adapter's A on its own
    alone = [] if products else ["attn.to_out.0"] * n_blocks + ["img_mlp.out"] * n_blocks
    assert sorted(c.split(".", 2)[2] for c in got_called) == alone
    # uninstalled: diffusers' own forward again
    assert lora_shared.uninstall_swiglu(tr) == n_blocks and attention21.uninstall(tr) == n_blocks
    assert all("forward" not in b.img_mlp.__dict__ for b in tr.transformer_blocks)


def test_shared_input_lora_falls_back_to_peft_where_it_cannot_fuse(tiny_pipe_21):
    """Dropout, a disabled adapter, or a layer without LoRA: each layer is called as it is (peft's own forward)."""
    from peft import LoraConfig

    from qwen_zero_prior.training import lora_shared

    tr = tiny_pipe_21.transformer
    attn = tr.transformer_blocks[0].attn
    x = torch.randn(1, 3, attn.to_q.in_features)
    assert lora_shared._adapter((attn.to_q, attn.to_k)) is None  # plain Linears: no LoRA yet
    assert [torch.equal(a, b) for a, b in zip(lora_shared.project(x, (attn.to_q, attn.to_k)),
                                              (attn.to_q(x), attn.to_k(x)))] == [True, True]
    tr.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["to_q", "to_k"]))
    assert lora_shared._adapter((attn.to_q, attn.to_k)) is None  # dropout: peft's forward
    tr.delete_adapters("default")
    tr.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]))
    assert lora_shared._adapter((attn.to_q, attn.to_k)) == "default"
    assert lora_shared._adapter((attn.to_q, attn.to_v)) is None  # to_v has no adapter
    tr.disable_adapters()
    assert lora_shared._adapter((attn.to_q, attn.to_k)) is None


def test_compile_installs_the_shared_input_lora(tiny_pipe_21, dataset_dir, make_config, tmp_path):
    """With model.compile the 2.1 trainer's blocks run q/k/v through attention21's processor and the SwiGLU through
    lora_shared (no attention_backend needed); eager training keeps diffusers' modules."""
    from qwen_zero_prior.training import lora_shared, rope

    eager = copy.deepcopy(tiny_pipe_21)
    Trainer(make_config(steps=1), eager, _examples(dataset_dir), tmp_path / "eager")
    assert {type(b.attn.processor).__name__ for b in eager.transformer.transformer_blocks} == {
        "QwenImage21AttnProcessor"}
    assert all("forward" not in b.img_mlp.__dict__ for b in eager.transformer.transformer_blocks)
    cfg = make_config(steps=1)
    cfg.model.compile = True
    try:
        Trainer(cfg, tiny_pipe_21, _examples(dataset_dir), tmp_path / "compiled")
        blocks = tiny_pipe_21.transformer.transformer_blocks
        assert {type(b.attn.processor).__name__ for b in blocks} == {"Segments21AttnProcessor"}
        assert lora_shared.uninstall_swiglu(tiny_pipe_21.transformer) == len(blocks)
    finally:
        rope.uninstall()


def test_resolution_must_fit_the_family(tiny_pipe_21, dataset_dir, make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"^train.resolution must be a multiple of 32 for Qwen-Image 2.1, got 48$"):
        Trainer(make_config(resolution=48), tiny_pipe_21, _examples(dataset_dir), tmp_path)


def test_overfit_only_token_row_moves(tiny_pipe_21, dataset_dir, make_config, tmp_path, caplog):
    """Token + LoRA training on 2.1 through the loop overfits one sample (its noise and noise level held fixed):
    the loss falls, also on other noise, the token moves far off its init, and every text-encoder weight except
    the token's row, every base transformer weight and the VAE stay bit-identical."""
    import logging

    pipe = tiny_pipe_21
    te_before = {k: v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()}
    dit_before = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    vae_before = {k: v.detach().clone() for k, v in pipe.vae.state_dict().items()}
    cfg = make_config(steps=30, placeholder_init_std=1e-5, learning_rate=1e-2, token_learning_rate=5e-2,
                      weight_decay=0.1).replace(debug={"log_prompt_ids": True})
    caplog.set_level(logging.INFO, logger="qwen_zero_prior")
    trainer = Trainer(cfg, pipe, _examples(dataset_dir)[:1], tmp_path)
    trainer.sample_seeds = lambda: [5]  # the same noise and noise level every step: an overfit
    init = trainer.token.vector.detach().clone()

    def other_noise_loss():
        with torch.no_grad():
            return sum(float(trainer.loss_for([0], torch.Generator().manual_seed(100 + i))) for i in range(4)) / 4

    before = other_noise_loss()
    result = trainer.fit(tmp_path / "weights.zip")
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses
    assert other_noise_loss() < before
    assert result.token_id == 151669 and trainer.token.token_id == 151669
    assert "registered as id 151669" in caplog.text and "[64, 6548, 315, 220, 151669" in caplog.text
    groups = trainer.optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    vec = trainer.token.vector.detach().clone()
    assert (vec - init).norm() > 100 * init.norm(), "the token row stayed at its init"

    materialize(pipe.text_encoder)
    text_parts.unpark(pipe.text_encoder)  # training replaced the unused LM head (text_parts.park): compare it too
    after_te = pipe.text_encoder.state_dict()
    assert set(after_te) == set(te_before)
    key = "model.language_model.embed_tokens.weight"
    assert after_te[key].shape == (151936, 32)  # Qwen3-VL's table: never resized
    for k, v in after_te.items():
        if k == key:
            assert (v != te_before[k]).any(dim=1).nonzero().flatten().tolist() == [151669]
            assert torch.equal(v[151669], vec)
        else:
            assert torch.equal(v, te_before[k]), f"text-encoder weight {k} changed"
    base = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert set(base) == set(dit_before)
    for k, v in base.items():
        assert torch.equal(v, dit_before[k]), f"transformer weight {k} changed"
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, vae_before[k]), k


def test_loop_loss_is_flow21s(tiny_pipe_21, dataset_dir, make_config, tmp_path):
    """The loop's loss on 2.1 (its sigmas, the backend's latents, conditioning and transformer call) equals
    ``flow21.flow_matching_loss`` (checked against the pipeline in test_qwen21.py) on the same inputs, with the
    timestep that diffusers' 2.1 script draws from the same random numbers."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qwen_zero_prior.training.prompt21 import PromptEncoder21

    trainer = Trainer(make_config(steps=1, batch_size=2), tiny_pipe_21, _examples(dataset_dir), tmp_path)
    ex = trainer.examples[0]
    x0 = flow21.encode_latents(tiny_pipe_21.vae, load_pixels(ex.image, ex.bucket)[None])
    torch.testing.assert_close(trainer.latents_for([0]), x0, rtol=0, atol=1e-6)
    assert x0.shape == (1, 64, 1, 2, 2)

    inputs = trainer.step_inputs([0, 1], sample_seeds=[7, 8])
    sched = FlowMatchEulerDiscreteScheduler.from_config(tiny_pipe_21.scheduler.config)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    for g in gens:  # the loop draws each sample's noise first, then its timestep
        torch.randn(inputs.x0.shape[1:], generator=g)
    timesteps, sigmas = flow21.sample_timesteps(sched, 2, "none", gens)
    torch.testing.assert_close(inputs.sigmas, sigmas.flatten(), rtol=0, atol=0)
    with torch.no_grad():
        loss = trainer.loss_for(None, inputs=inputs)
        enc = PromptEncoder21(tiny_pipe_21, trainer.token.token_id)
        embeds, mask = enc.encode([trainer.examples[i].caption for i in (0, 1)], torch.float32, torch.device("cpu"))
        want = flow21.flow_matching_loss(tiny_pipe_21.transformer, inputs.x0, inputs.noise, timesteps, sigmas,
                                         embeds, mask)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


def test_archive_loads_in_diffusers_21(tiny_pipe_21, dataset_dir, make_config, tmp_path):
    """The trained archive: meta.json records the family, base model and 2.1's targets; its LoRA loads in
    ``QwenImage21Pipeline.load_lora_weights`` itself with no unexpected and no missing keys, and the fused
    weights are W + B·A."""
    from peft.utils import get_peft_model_state_dict

    fresh = copy.deepcopy(tiny_pipe_21)
    cfg = make_config("my-2.1-model", steps=3)
    trainer = Trainer(cfg, tiny_pipe_21, _examples(dataset_dir), tmp_path)
    path = trainer.fit(tmp_path / "weights.zip").archive
    meta = json.loads(zipfile.ZipFile(path).read("meta.json"))
    assert meta["model_family"] == "qwen-image-2.1" and meta["base_model"] == "my-2.1-model"
    assert meta["lora_targets"] == TARGETS_21 and meta["placeholder_token_id"] == 151669
    assert meta["embedding_dim"] == 32 and meta["steps"] == 3

    sd = load_archive(path).lora_state_dict
    assert len(sd) == 2 * 7 * 2 and all(k.startswith("transformer.transformer_blocks.") for k in sd)
    base = {n: p.detach().clone() for n, p in fresh.transformer.named_parameters()}
    fresh.load_lora_weights(dict(sd), adapter_name="zp")
    loaded = {f"transformer.{k}" for k in get_peft_model_state_dict(fresh.transformer, adapter_name="zp")}
    assert sorted(loaded - set(sd)) == [] and sorted(set(sd) - loaded) == []
    fresh.fuse_lora(components=["transformer"], lora_scale=1.0)
    fused = dict(fresh.transformer.named_parameters())
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        b = sd[key.replace(".lora_A.", ".lora_B.")]
        name = f"{module}.base_layer.weight" if f"{module}.base_layer.weight" in fused else f"{module}.weight"
        torch.testing.assert_close(fused[name], base[f"{module}.weight"] + b @ a, rtol=0, atol=1e-6)


def test_fp8_matmul_converts_2_1s_block_layers(tiny_pipe_21, dataset_dir, make_config, tmp_path):
    """``model.fp8_matmul`` on 2.1: the frozen base weight of each block's seven projections (single-stream:
    text and image tokens both go through them) becomes fp8; the LoRA and the token still train."""
    from qwen_zero_prior.training import families
    from qwen_zero_prior.training.fp8 import IMAGE_STREAM, Fp8Linear

    assert families.get_family("qwen-image").fp8_modules == IMAGE_STREAM
    assert list(families.get_family("qwen-image-2.1").fp8_modules) == TARGETS_21
    cfg = make_config(steps=2).replace(model={"fp8_matmul": True})
    trainer = Trainer(cfg, tiny_pipe_21, _examples(dataset_dir), tmp_path)
    names = sorted(n.removesuffix(".base_layer") for n, m in tiny_pipe_21.transformer.named_modules()
                   if isinstance(m, Fp8Linear))
    assert names == sorted(f"transformer_blocks.{i}.{t}" for i in range(2) for t in TARGETS_21)
    vec = trainer.token.vector.detach().clone()
    losses = [trainer.train_step() for _ in range(2)]
    assert all(np.isfinite(losses)) and not torch.equal(trainer.token.vector.detach(), vec)


def test_gradient_checkpointing_gives_the_same_steps(tiny_pipe_21, dataset_dir, make_config, tmp_path):
    runs = []
    for gc in (False, True):
        cfg = make_config(steps=2).replace(model={"gradient_checkpointing": gc})
        trainer = Trainer(cfg, copy.deepcopy(tiny_pipe_21), _examples(dataset_dir), tmp_path / str(gc))
        runs.append(([trainer.train_step() for _ in range(2)], trainer.token.vector.detach().clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-8)


# ---- the CLI on a 2.1 folder ------------------------------------------------------------------------------


def _predict(main, out, *extra):
    return main(["predict", "--prompt", "a photo of <zwx>", "--steps", "2", "--width", "32", "--height", "32",
                 "--dtype", "float32", "--device", "cpu", "--output", str(out), *extra])


def test_cli_train_predict_on_a_2_1_folder(tiny_model_dir_21, dataset_dir, tmp_path, capsys):
    """``qwen-zero-prior train`` on a 2.1 folder (family detected; also named in the config), with samples during
    training, then ``predict`` with the archive (its meta names the base model and family): the trained token
    and LoRA change the image; the base model alone gives another."""
    from qwen_zero_prior.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"model:\n  base_model: {tiny_model_dir_21}\n  family: qwen-image-2.1\n  dtype: float32\n  device: cpu\n"
        "train:\n  train_placeholder_token: true\n  placeholder_token: '<zwx>'\n  rank: 4\n  steps: 4\n"
        "  resolution: 32\n  checkpoint_every: 0\n  learning_rate: 0.01\n  token_learning_rate: 0.05\n"
        "sample:\n  prompts: ['a photo of <zwx>']\n  every: 4\n  steps: 2\n  guidance: 1\n"
    )
    rc = main(["train", "--config", str(cfg), "--dataset", str(dataset_dir), "--output", str(tmp_path / "run" / "w.zip")])
    assert rc == 0, capsys.readouterr().err
    arc = load_archive(tmp_path / "run" / "w.zip")
    assert arc.meta.model_family == "qwen-image-2.1" and arc.meta.base_model == str(tiny_model_dir_21)
    assert arc.meta.placeholder_token_id == 151669 and arc.has_lora and arc.meta.lora_targets == TARGETS_21
    assert Image.open(tmp_path / "run" / "samples" / "step-000004-0.png").size == (32, 32)

    # auto-detected family: the same folder without model.family trains too
    rc = main(["train", "--set", f"model.base_model={tiny_model_dir_21}", "--set", "model.dtype=float32",
               "--set", "model.device=cpu", "--set", "train.steps=1", "--set", "train.resolution=32",
               "--set", "train.checkpoint_every=0", "--dataset", str(dataset_dir), "--output", str(tmp_path / "auto.zip")])
    assert rc == 0 and load_archive(tmp_path / "auto.zip").meta.model_family == "qwen-image-2.1"

    assert _predict(main, tmp_path / "with.png", "--archive", str(tmp_path / "run" / "w.zip")) == 0
    assert _predict(main, tmp_path / "base.png", "--base-model", str(tiny_model_dir_21)) == 0
    capsys.readouterr()
    with_w = np.asarray(Image.open(tmp_path / "with.png"), dtype=np.int16)
    plain = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.int16)
    assert with_w.shape == plain.shape == (32, 32, 4)  # 2.1's VAE decodes RGBA
    assert np.abs(with_w - plain).max() > 0


def test_cli_family_errors(tiny_model_dir, tiny_model_dir_21, dataset_dir, tmp_path, capsys):
    """One clear error each: model.family contradicting the folder; a 2.1 archive on a Qwen-Image base model."""
    from qwen_zero_prior.cli import main

    rc = main(["train", "--set", f"model.base_model={tiny_model_dir_21}", "--set", "model.family=qwen-image",
               "--set", "model.device=cpu", "--set", "train.steps=1", "--dataset", str(dataset_dir),
               "--output", str(tmp_path / "x.zip")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (
        f"error: model.family is 'qwen-image' (Qwen-Image) but {tiny_model_dir_21} holds a Qwen-Image 2.1 pipeline "
        "(QwenImage21Pipeline); set model.family to 'qwen-image-2.1' or auto")

    from qwen_zero_prior.training.archive import ArchiveMeta, write_archive

    meta = ArchiveMeta(base_model=str(tiny_model_dir_21), placeholder_token="<zwx>", placeholder_token_id=151669,
                       rank=None, created=ArchiveMeta.now(), model_family="qwen-image-2.1")
    arc = write_archive(tmp_path / "q21.zip", meta, None, torch.zeros(32))
    rc = _predict(main, tmp_path / "no.png", "--archive", str(arc), "--base-model", str(tiny_model_dir))
    err = capsys.readouterr().err
    assert rc == 2 and "this archive was trained on Qwen-Image 2.1 (meta.json model_family 'qwen-image-2.1') but " \
                       "the base model is Qwen-Image ('qwen-image')" in err
    assert not (tmp_path / "no.png").exists()


def test_fp8_storage_on_2_1(tiny_model_dir_21, dataset_dir, make_config, tmp_path):
    """``model.quantize`` (the transformer's weights stored in fp8) trains LoRA and token on 2.1;
    ``model.quantize_te`` (the text encoder's too) trains a plain LoRA."""
    from qwen_zero_prior.training.models import load_pipeline
    from qwen_zero_prior.training.run import train

    cfg = make_config(tiny_model_dir_21, steps=2).replace(model={"quantize": True})
    pipe = load_pipeline(cfg.model)
    assert pipe.transformer.transformer_blocks[0].img_mlp.gate_layer.weight.dtype == torch.float8_e4m3fn
    arc = load_archive(train(cfg, dataset_dir, tmp_path / "w.zip", pipe=pipe).archive)
    assert arc.has_lora and arc.has_token and all(torch.isfinite(v).all() for v in arc.lora_state_dict.values())
    te_cfg = make_config(tiny_model_dir_21, steps=1, train_placeholder_token=False).replace(model={"quantize_te": True})
    te_pipe = load_pipeline(te_cfg.model)
    assert te_pipe.text_encoder.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    plain = load_archive(train(te_cfg, dataset_dir, tmp_path / "plain.zip", pipe=te_pipe).archive)
    assert plain.has_lora and not plain.has_token and plain.meta.model_family == "qwen-image-2.1"


# ---- the 24 GiB plan (model.offload) on 2.1: every weight on the device, fp8 storage where needed ------------


@pytest.mark.parametrize("storage", ["fp8", "bf16", "stream"])
def test_offload_plan_for_2_1_trains_only_the_token_row(tiny_pipe_21, dataset_dir, make_config, tmp_path, storage):
    """The plan ``memory.choose_21`` makes for a capacity is what ``apply_offload(text_encoder="auto")`` applies
    for the same budget: every transformer block resident in fp8, the text decoder's layers as loaded, in fp8 or
    streamed, as much as fits. Training under it: the loss is finite, the token's row and the LoRA move, and every
    stored base weight (fp8 or not) and every other embedding row stay bit-identical."""
    from qwen_zero_prior.training import memory
    from qwen_zero_prior.training.fp8 import FP8
    from qwen_zero_prior.training.offload import OffloadedLinear, apply_offload

    pipe = tiny_pipe_21
    trainer = Trainer(make_config(steps=3, token_learning_rate=5e-2), pipe, _examples(dataset_dir), tmp_path)
    parts = memory.weight_parts(pipe)  # after the LoRA, as apply_offload counts them
    gpu = memory.offload_gpu_bytes(parts, "fp8" if storage == "stream" else storage)
    capacity = gpu + (1 if storage != "stream" else -1)  # just enough (or one byte short of fp8: streamed)
    plan = memory.choose_21("auto", parts=parts, weights_bytes=parts.total, resolution=32, batch_size=1,
                            device=torch.device("cuda", 0), capacity_bytes=capacity, reserve_gib=0)
    assert plan.mode == "offload" and plan.layout["text_encoder_layers"] == storage
    summary = apply_offload(pipe, torch.device("cpu"), capacity / 2**30, reserve_gib=0, text_encoder="auto")
    assert summary["text_encoder_storage"] == storage and summary["streamed_blocks"] == 0
    lm = pipe.text_encoder.model.language_model
    q = lm.layers[0].self_attn.q_proj
    if storage == "bf16":  # as loaded (float32 here): plain Linears, nothing converted
        assert type(q) is torch.nn.Linear and summary["text_encoder"] == 0
    else:
        assert isinstance(q, OffloadedLinear) and q.stored.dtype == (FP8 if storage == "fp8" else torch.float32)
    block = pipe.transformer.transformer_blocks[0]
    assert isinstance(block.img_mlp.gate_layer.base_layer, OffloadedLinear)
    assert block.img_mlp.gate_layer.base_layer.stored.dtype == FP8

    def offloaded():
        return {f"{k}.{n}": m for k, root in (("dit", pipe.transformer), ("te", pipe.text_encoder))
                for n, m in root.named_modules() if isinstance(m, OffloadedLinear)}

    stored = {n: m.stored.clone() for n, m in offloaded().items()}
    assert len(stored) == 2 * 7 + (0 if storage == "bf16" else 2 * 7)  # 7 Linears a block and a decoder layer
    plain = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters() if "embed_tokens" not in n}
    table = trainer.token.module.base.weight.detach().clone()
    vec, lora = trainer.token.vector.detach().clone(), [p.detach().clone() for p in trainer.lora_params]
    losses = [trainer.train_step() for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    assert not torch.equal(trainer.token.vector.detach(), vec)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(trainer.lora_params, lora))
    for n, m in offloaded().items():
        assert torch.equal(m.stored, stored[n]), n
    for n, p in pipe.text_encoder.named_parameters():
        if n in plain:
            assert torch.equal(p.detach(), plain[n]), n
    materialize(pipe.text_encoder)
    after = pipe.text_encoder.get_input_embeddings().weight
    assert (after != table).any(dim=1).nonzero().flatten().tolist() == [trainer.token.token_id]


@pytest.mark.parametrize("storage", ["fp8", "bf16"])
def test_offload_explicit_text_storage_streams_blocks_that_do_not_fit_beside_it(tiny_pipe_21, storage):
    """An explicit text-decoder storage on the GPU (not ``auto``) takes its bytes out of the budget first: the
    transformer blocks that no longer fit are streamed from CPU memory instead of overfilling the GPU."""
    from qwen_zero_prior.training import memory
    from qwen_zero_prior.training.offload import apply_offload, block_bytes_fp8

    pipe = tiny_pipe_21
    parts = memory.weight_parts(pipe)
    te = parts.te_layers if storage == "bf16" else parts.te_layers_fp8
    emb = pipe.text_encoder.get_input_embeddings().weight
    per_block = block_bytes_fp8(pipe.transformer)
    budget = emb.numel() * emb.element_size() + te + per_block + per_block // 2  # room for one block beside it
    summary = apply_offload(pipe, torch.device("cpu"), budget / 2**30, reserve_gib=0, text_encoder=storage)
    n = len(pipe.transformer.transformer_blocks)
    assert summary["text_encoder_storage"] == storage
    assert (summary["resident_blocks"], summary["streamed_blocks"]) == (1, n - 1), summary


def test_forward_t2i_is_the_transformer_call_with_the_layout_cached(tiny_pipe_21, monkeypatch):
    """flow21.forward_t2i (the training step's 2.1 transformer call) gives diffusers' forward's outputs and
    gradients exactly, with and without padding, with checkpointing, and builds the layout once per (text length,
    h, w): a second call does not run the RoPE builder (the host-side position lists) again; a hook on the model's
    forward sends the call through diffusers' forward."""
    from qwen_zero_prior.training import attention21

    tr = tiny_pipe_21.transformer
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, tiny_pipe_21.vae.config.z_dim, 1, 4, 6, generator=g)
    embeds = torch.randn(2, 5, tr.config.context_in_dim, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    cache = flow21.LayoutCache(size=2)

    def run(fn, mask):
        e = embeds.clone().requires_grad_(True)
        tr.zero_grad(set_to_none=True)
        out = fn(e, mask)
        out.square().sum().backward()
        return out.detach(), e.grad, tr.img_in.weight.grad

    tr.img_in.weight.requires_grad_(True)
    for mask in (None, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])):
        for checkpointing in (False, True):
            if checkpointing:
                tr.enable_gradient_checkpointing()
            ref = run(lambda e, m: flow21.forward(tr, noisy, sigma, e, m), mask)
            got = run(lambda e, m: flow21.forward_t2i(tr, noisy, sigma, e, m, cache), mask)
            tr.disable_gradient_checkpointing()
            for a, b in zip(ref, got):
                assert torch.equal(a, b)
    assert cache.misses == 1  # one layout: built once
    calls = []
    monkeypatch.setattr(type(tr.pos_embed), "forward", lambda *a, **k: calls.append(a))
    with torch.no_grad():
        flow21.forward_t2i(tr, noisy, sigma, embeds, None, cache)
    assert calls == [] and cache.misses == 1
    # another layout is built, and the oldest goes beyond the cache's size
    monkeypatch.undo()
    with torch.no_grad():
        flow21.forward_t2i(tr, noisy, sigma, embeds[:, :3], None, cache)
        flow21.forward_t2i(tr, noisy[..., :4], sigma, embeds[:, :3], None, cache)
    assert cache.misses == 3 and len(cache._entries) == 2
    # diffusers' flex processor: its block mask depends on the padding, so the call goes through forward()
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

    tr.transformer_blocks[0].attn.set_processor(QwenImage21FlexAttnProcessor())
    assert not flow21._plain_segments_path(tr)
    attention21.install(tr, "_native_math")
    assert flow21._plain_segments_path(tr)
    handle = tr.register_forward_pre_hook(lambda *a: None)
    assert not flow21._plain_segments_path(tr)
    handle.remove()
    assert flow21._plain_segments_path(tr)

