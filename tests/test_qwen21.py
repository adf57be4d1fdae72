"""Qwen-Image 2.1 in the core: tokenizer facts, the tiny pipeline, conditioning equal to
QwenImage21Pipeline.encode_prompt (values and gradients), the placeholder on Qwen3-VL, LoRA export that
diffusers loads, inference with an archive, and the flow-matching objective."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from qwen_zero_prior.training import families, flow21
from qwen_zero_prior.training.prompt21 import PromptEncoder21, drop_count
from qwen_zero_prior.training.suffix import SuffixDecoder, supported
from qwen_zero_prior.training.token import install_placeholder

CPU = torch.device("cpu")
CAPTIONS = ["a photo of <zwx> on a beach", "<zwx>", "a dog in the snow", "a <zwx> and a second <zwx>, oil painting"]


def _token(pipe, std=0.3, seed=1):
    tok = families.get_family("qwen-image-2.1").tokenizer(pipe)
    return install_placeholder(tok, pipe.text_encoder, "<zwx>", init_std=std, generator=torch.Generator().manual_seed(seed))


# ---- tokenizer --------------------------------------------------------------------------------------------


def test_tokenizer_21_is_qwen_image_plus_four_tokens(tokenizer_dir):
    from qwen_zero_prior.training.tiny import QWEN3_ADDED_TOKENS, load_tokenizer_21, load_tokenizer

    qi, _ = load_tokenizer(tokenizer_dir)
    q3, real = load_tokenizer_21(tokenizer_dir)
    assert real and len(qi) == 151665 and len(q3) == 151669
    assert [q3.convert_tokens_to_ids(t) for t in QWEN3_ADDED_TOKENS] == [151665, 151666, 151667, 151668]
    assert QWEN3_ADDED_TOKENS == ("<tool_response>", "</tool_response>", "<think>", "</think>")
    added = q3.added_tokens_decoder
    assert not any(added[i].special for i in range(151665, 151669))  # as in Qwen3's tokenizer_config.json
    text = "a photo of a cat <|im_start|> 東京"
    assert q3(text)["input_ids"] == qi(text)["input_ids"]  # same vocab and merges
    assert q3("<think>x</think>")["input_ids"] == [151667, 87, 151668]
    # a fresh placeholder lands right after them, as with ComfyUI's bundled Qwen3-VL tokenizer
    from qwen_zero_prior.training.token import add_placeholder_token

    assert add_placeholder_token(q3, "<zwx>") == 151669
    assert q3("a photo of <zwx>", add_special_tokens=False)["input_ids"] == [64, 6548, 315, 220, 151669]


def test_shared_tokenizer_files_equal_comfyui_bundled_one(tokenizer_dir):
    """docs/qwen-image-2.1.md: ComfyUI's Qwen3-VL encoder uses comfy/text_encoders/qwen25_tokenizer, whose vocab
    and merges are byte-identical to Qwen-Image's (SHA-256 below, checked on ComfyUI 0.33.0)."""
    digests = {name: hashlib.sha256((tokenizer_dir / name).read_bytes()).hexdigest()
               for name in ("vocab.json", "merges.txt")}
    assert digests == {
        "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
        "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
    }


# ---- the tiny pipeline ----------------------------------------------------------------------------------


def test_tiny_pipeline_21_real_classes(tiny_pipe_21):
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Pipeline, QwenImage21Transformer2DModel
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    p = tiny_pipe_21
    assert isinstance(p, QwenImage21Pipeline) and isinstance(p.transformer, QwenImage21Transformer2DModel)
    assert isinstance(p.vae, AutoencoderKLQwenImage21) and isinstance(p.processor, Qwen3VLProcessor)
    assert isinstance(p.text_encoder, Qwen3VLForConditionalGeneration)
    assert p.text_encoder.get_input_embeddings().weight.shape == (151936, 32)
    # the system turn is what the pipeline drops: exactly "<|im_start|>system\n...<|im_end|>\n"
    ids = p.processor(text=[p.prompt_template_t2i.format("x")])["input_ids"][0]
    sys_turn = "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
    assert p.processor.tokenizer.decode(ids[: drop_count(p)]) == sys_turn


def test_tiny_pipeline_21_generates(tiny_pipe_21):
    img = tiny_pipe_21("a cat", num_inference_steps=2, height=64, width=64,
                       generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64) and img.mode == "RGBA"  # 2.1's VAE decodes four channels


def test_tiny_pipeline_21_saved_folder_is_detected(tiny_pipe_21, tmp_path):
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        # transformers builds a Qwen3VLProcessor (saving or loading one) only with torchvision
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    else:
        tiny_pipe_21.save_pretrained(tmp_path)
    assert families.detect_folder(tmp_path).name == "qwen-image-2.1"
    assert families.resolve_family("auto", tmp_path) is families.get_family("qwen-image-2.1")


# ---- SuffixDecoder on Qwen3 (q/k norms, GQA, interleaved m-RoPE, no final norm) --------------------------


def test_suffix_decoder_qwen3_equals_full_forward(tiny_pipe_21):
    lm = tiny_pipe_21.text_encoder.model.language_model
    assert supported(lm)
    dec = SuffixDecoder(lm, cuda_graphs=False, final_norm=False)
    assert dec.qk_norm and dec.n_kv == 1 and dec.n_heads == 2
    ids = torch.randint(0, 151000, (1, 23), generator=torch.Generator().manual_seed(0))
    emb = lm.embed_tokens(ids)
    from qwen_zero_prior.training.prompt21 import without_final_norm

    with without_final_norm(lm):
        ref = lm(inputs_embeds=emb, use_cache=False).last_hidden_state
    normed = lm(inputs_embeds=emb, use_cache=False).last_hidden_state
    k, v, h = dec.prefix(emb[:, :9])
    k2, v2, h2 = dec.prefix(emb[:, 9:14], k, v)  # extend a cached prefix
    out = dec.suffix(emb[:, 14:], k2, v2)
    assert k2.shape[3] == 14
    torch.testing.assert_close(torch.cat([h, h2, out], dim=1), ref, rtol=0, atol=2e-6)
    assert (normed - ref).abs().max() > 0.1  # the final norm matters: the comparison can tell them apart
    with torch.no_grad():
        normed_dec = SuffixDecoder(lm, cuda_graphs=False).suffix(emb[:, 14:], k2, v2)
    torch.testing.assert_close(normed_dec, normed[:, 14:], rtol=0, atol=2e-6)


# ---- conditioning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_conditioning_equals_encode_prompt(tiny_pipe_21, prefix_cache):
    reg = _token(tiny_pipe_21)
    assert reg.token_id == 151669
    enc = PromptEncoder21(tiny_pipe_21, reg.token_id, prefix_cache=prefix_cache)
    ref, ref_mask, image_pad = tiny_pipe_21.encode_prompt(CAPTIONS)
    for _ in range(2):  # second round: from the caches
        embeds, mask = enc.encode(CAPTIONS, torch.float32, CPU)
        assert embeds.shape == ref.shape and torch.equal(mask, ref_mask.long())
        torch.testing.assert_close(embeds, ref, rtol=0, atol=1e-6)
    assert not image_pad.any()
    assert (ref.abs().max() > 0.5) and (reg.token_id in enc.ids(CAPTIONS[0]))
    # a single prompt: no padding, and encode_prompt then gives no mask
    one, one_mask, _ = tiny_pipe_21.encode_prompt(["<zwx>"])
    e, m = enc.encode(["<zwx>"], torch.float32, CPU)
    assert one_mask is None and bool(m.all())
    torch.testing.assert_close(e, one, rtol=0, atol=1e-6)


def test_conditioning_is_pre_norm(tiny_pipe_21):
    """The pipeline conditions on the last decoder layer before the final RMSNorm (whose tiny weight is not all
    ones, so the post-norm state differs): the encoder must give that, not the normed state."""
    enc = PromptEncoder21(tiny_pipe_21, None)
    e, _ = enc.encode(["a dog"], torch.float32, CPU)
    lm = tiny_pipe_21.text_encoder.model.language_model
    ids = torch.tensor([enc.ids("a dog")])
    post = lm(input_ids=ids).last_hidden_state[:, drop_count(tiny_pipe_21):]
    assert (e - post).abs().max() > 0.1
    torch.testing.assert_close(e, tiny_pipe_21.encode_prompt(["a dog"])[0], rtol=0, atol=1e-6)


def test_empty_caption_is_a_space(tiny_pipe_21):
    enc = PromptEncoder21(tiny_pipe_21, None)
    torch.testing.assert_close(enc.encode([""], torch.float32, CPU)[0], tiny_pipe_21.encode_prompt([""])[0],
                               rtol=0, atol=1e-6)


def test_gradients_reach_only_the_vector_and_equal_encode_prompts(tiny_pipe_21):
    reg = _token(tiny_pipe_21)
    enc = PromptEncoder21(tiny_pipe_21, reg.token_id)
    weights = torch.randn(4, 21, 32, generator=torch.Generator().manual_seed(5))

    ref, _, _ = tiny_pipe_21.encode_prompt(CAPTIONS)
    (ref * weights[:, : ref.shape[1]]).sum().backward()
    want = reg.vector.grad.clone()
    reg.vector.grad = None
    embeds, _ = enc.encode(CAPTIONS, torch.float32, CPU)
    (embeds * weights[:, : embeds.shape[1]]).sum().backward()
    assert want.abs().sum() > 0
    torch.testing.assert_close(reg.vector.grad, want, rtol=1e-5, atol=1e-7)
    trainable = [n for n, p in tiny_pipe_21.text_encoder.named_parameters() if p.requires_grad]
    assert trainable == ["model.language_model.embed_tokens.vector"]
    assert all(p.grad is None for n, p in tiny_pipe_21.text_encoder.named_parameters() if not p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
def test_conditioning_cuda_graphs_equal_encode_prompt(tiny_pipe_21):
    pipe = tiny_pipe_21.to("cuda")
    reg = _token(pipe)
    enc = PromptEncoder21(pipe, reg.token_id, cuda_graphs=True)
    weights = torch.randn(4, 21, 32, generator=torch.Generator().manual_seed(5)).cuda()
    ref, _, _ = pipe.encode_prompt(CAPTIONS)
    (ref * weights[:, : ref.shape[1]]).sum().backward()
    want = reg.vector.grad.clone()
    for _ in range(3):  # capture, then replay
        reg.vector.grad = None
        embeds, _ = enc.encode(CAPTIONS, torch.float32, torch.device("cuda"))
        (embeds * weights[:, : embeds.shape[1]]).sum().backward()
        torch.testing.assert_close(embeds, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(reg.vector.grad, want, rtol=1e-4, atol=1e-6)
    assert enc.suffix._graphs


def test_system_prefix_computed_once(tiny_pipe_21):
    reg = _token(tiny_pipe_21)
    enc = PromptEncoder21(tiny_pipe_21, reg.token_id)
    calls = []
    real = enc.suffix.prefix
    enc.suffix.prefix = lambda *a: calls.append(a[0].shape[1]) or real(*a)
    enc.encode(CAPTIONS, torch.float32, CPU)
    enc.encode(CAPTIONS, torch.float32, CPU)
    drop = drop_count(tiny_pipe_21)
    # the system turn once, then once per caption its text up to the first <zwx> (its user-turn header at least);
    # a caption without the token runs the whole decoder instead
    firsts = [enc.ids(c).index(reg.token_id) - drop for c in CAPTIONS if "<zwx>" in c]
    assert calls == [drop, *firsts] and len(firsts) == 3
    # a caption without the token does not depend on the vector: encoded once, no autograd graph kept
    assert list(enc._fixed) == ["a dog in the snow"] and not enc._fixed["a dog in the snow"].requires_grad


# ---- the placeholder on Qwen3-VL -----------------------------------------------------------------------------


def test_only_the_vector_moves(tiny_pipe_21):
    te = tiny_pipe_21.text_encoder
    before = {n: p.detach().clone() for n, p in te.state_dict().items()}
    reg = _token(tiny_pipe_21, std=1e-5)
    assert te.get_input_embeddings().weight.shape == (151936, 32)  # never shrunk to len(tokenizer)
    enc = PromptEncoder21(tiny_pipe_21, reg.token_id)
    target = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(2))
    start = reg.vector.detach().clone()
    opt = torch.optim.AdamW([reg.vector], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        e, _ = enc.encode(["a photo of <zwx>"], torch.float32, CPU)
        loss = ((e - target[:, : e.shape[1]]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (reg.vector.detach() - start).abs().max() > 1e-3
    after = te.get_input_embeddings().base.weight
    assert torch.equal(after, before["model.language_model.embed_tokens.weight"])
    now = {n.replace("embed_tokens.base.", "embed_tokens."): p for n, p in te.state_dict().items()
           if not n.endswith("embed_tokens.vector")}
    assert set(now) == set(before)
    for n, p in now.items():
        assert torch.equal(p, before[n]), n
    # the pipeline's own encoding now carries the trained vector at the token
    ref = tiny_pipe_21.encode_prompt(["a photo of <zwx>"])[0]
    torch.testing.assert_close(enc.encode(["a photo of <zwx>"], torch.float32, CPU)[0], ref, rtol=0, atol=1e-6)


# ---- LoRA --------------------------------------------------------------------------------------------------


def test_lora_export_loads_in_diffusers_21(tiny_pipe_21):
    from qwen_zero_prior.training.lora import add_lora, export_lora, load_lora_into_pipeline

    fam = families.get_family("qwen-image-2.1")
    trained = copy.deepcopy(tiny_pipe_21)
    adapted = add_lora(trained.transformer, 4, 8.0, fam.default_lora_targets, seed=0)
    assert len(adapted) == 7 * 2 and "transformer_blocks.1.img_mlp.gate_layer" in adapted
    with torch.no_grad():
        for n, p in trained.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    sd = export_lora(trained.transformer, 4, 8.0)
    assert all(k.startswith("transformer.transformer_blocks.") for k in sd) and len(sd) == 28

    fresh = copy.deepcopy(tiny_pipe_21)
    base = {n: p.detach().clone() for n, p in fresh.transformer.named_parameters()}
    report = load_lora_into_pipeline(fresh, sd)
    assert report == {"missing": [], "unexpected": []}
    fresh.fuse_lora(components=["transformer"], lora_scale=1.0)
    fused = dict(fresh.transformer.named_parameters())
    for module in adapted:
        a, b = sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"]
        name = f"{module}.base_layer.weight" if f"{module}.base_layer.weight" in fused else f"{module}.weight"
        torch.testing.assert_close(fused[name], base[f"{module}.weight"] + b @ a, rtol=0, atol=1e-6)


def test_lora_bad_target_names_the_real_modules(tiny_pipe_21):
    from qwen_zero_prior.training.config import ATTENTION_TARGETS
    from qwen_zero_prior.training.lora import LoraError, add_lora

    with pytest.raises(LoraError, match=r"\['add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out'\] match no module "
                                        r"of QwenImage21Transformer2DModel; use names such as attn.to_q, attn.to_k"):
        add_lora(tiny_pipe_21.transformer, 4, 4.0, list(ATTENTION_TARGETS))


# ---- inference ---------------------------------------------------------------------------------------------


def test_predict_with_archive_end_to_end(tiny_pipe_21, tmp_path):
    from qwen_zero_prior.training.archive import ArchiveMeta, load_archive, write_archive
    from qwen_zero_prior.training.inference import GenerateOptions, InferenceSession
    from qwen_zero_prior.training.lora import add_lora, export_lora

    trained = copy.deepcopy(tiny_pipe_21)
    add_lora(trained.transformer, 4, 4.0, families.get_family("qwen-image-2.1").default_lora_targets, seed=0)
    with torch.no_grad():
        for n, p in trained.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    meta = ArchiveMeta(base_model="tiny-2.1", placeholder_token="<zwx>", placeholder_token_id=151669, rank=4,
                       created=ArchiveMeta.now(), model_family="qwen-image-2.1")
    vec = torch.randn(32, generator=torch.Generator().manual_seed(4))
    arc = load_archive(write_archive(tmp_path / "w.zip", meta, export_lora(trained.transformer, 4, 4.0), vec))
    assert json.loads(__import__("zipfile").ZipFile(tmp_path / "w.zip").read("meta.json"))["model_family"] == \
        "qwen-image-2.1"

    session = InferenceSession(tiny_pipe_21)
    opts = GenerateOptions("a photo of <zwx>", steps=2, guidance=1.0, width=64, height=64, seed=0)
    plain = torch.tensor(__import__("numpy").asarray(session.generate(opts)), dtype=torch.float32)
    session.apply(arc)
    assert session.token_id == 151669 and session.lora_report == {"missing": [], "unexpected": []}
    tok = families.get_family("qwen-image-2.1").tokenizer(tiny_pipe_21)
    assert tok("<zwx>", add_special_tokens=False)["input_ids"] == [151669]
    with_arc = torch.tensor(__import__("numpy").asarray(session.generate(opts)), dtype=torch.float32)
    assert with_arc.shape == plain.shape == (64, 64, 4)
    diff = (with_arc - plain).abs()
    assert diff.mean() > 2.0 and (diff > 0).float().mean() > 0.5, (diff.mean(), (diff > 0).float().mean())
    session.clear()
    assert len(families.get_family("qwen-image-2.1").tokenizer(tiny_pipe_21)) == 151669  # token gone again
    again = torch.tensor(__import__("numpy").asarray(session.generate(opts)), dtype=torch.float32)
    assert torch.equal(again, plain)


# ---- the flow-matching objective -------------------------------------------------------------------------


def test_latents_match_the_pipelines_encoding_and_decoding(tiny_pipe_21):
    px = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = flow21.encode_latents(tiny_pipe_21.vae, px)
    assert z.shape == (2, 64, 1, 4, 6)
    rgba = flow21.to_rgba(px)[:, :, None]
    want = tiny_pipe_21._encode_vae_image(rgba, generator=None)  # the pipeline: argmax, (z - mean) / std
    torch.testing.assert_close(z, want, rtol=0, atol=1e-6)
    raw = tiny_pipe_21.vae.encode(rgba).latent_dist.mode()
    assert (z - raw).abs().max() > 0.1  # the tiny VAE's statistics are not 0/1: normalisation is visible
    out = flow21.decode_latents(tiny_pipe_21.vae, z)
    assert out.shape == (2, 4, 64, 96)
    with pytest.raises(flow21.LatentShapeError, match="multiples of 32, got 48x64"):
        flow21.encode_latents(tiny_pipe_21.vae, torch.zeros(1, 3, 64, 48))
    with pytest.raises(flow21.LatentShapeError, match=r"expected images \(batch, 3 or 4 channels, height, width\), "
                                                      r"got \(1, 2, 64, 64\)"):
        flow21.encode_latents(tiny_pipe_21.vae, torch.zeros(1, 2, 64, 64))


def test_pack_unpack_as_the_pipeline():
    from diffusers import QwenImage21Pipeline

    lat = torch.randn(2, 64, 1, 4, 6)
    torch.testing.assert_close(flow21.pack(lat), QwenImage21Pipeline._pack_latents(lat, 2, 64, 4, 6), rtol=0, atol=0)
    torch.testing.assert_close(flow21.unpack(flow21.pack(lat), 4, 6),
                               QwenImage21Pipeline._unpack_latents(flow21.pack(lat), 64, 96, 16), rtol=0, atol=0)
    with pytest.raises(flow21.LatentShapeError, match="latent grid 3x6 has an odd side"):
        flow21.pack(torch.randn(1, 64, 1, 3, 6))


def test_prediction_is_the_pipelines_transformer_call(tiny_pipe_21):
    """The loss's transformer call (layout, img_mask, timestep / 1000, padded text, output tail) reproduces the
    call QwenImage21Pipeline.__call__ makes, for a padded batch of two prompts."""
    pipe = tiny_pipe_21
    seen = {}
    real_forward = pipe.transformer.forward

    def record(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("out", out[0].detach().clone())
        return out

    pipe.transformer.forward = record
    latents = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))  # packed: 4x4 latents
    prompts = ["a photo of a red cat", "dog"]
    pipe(prompt=prompts, latents=latents, num_inference_steps=1, height=64, width=64, output_type="latent")
    pipe.transformer.forward = real_forward
    kw = seen["kwargs"]
    t = kw["timestep"] * 1000
    embeds, mask = PromptEncoder21(pipe, None).encode(prompts, torch.float32, CPU)
    with torch.no_grad():
        pred = flow21.predict(pipe.transformer, flow21.unpack(latents, 4, 4), t, embeds, mask)
    torch.testing.assert_close(flow21.pack(pred), seen["out"][:, -16:], rtol=0, atol=2e-5)
    assert kw["encoder_hidden_states_mask"] is not None and not bool(mask.all())


def test_loss_overfits_and_moves_only_lora_and_vector(tiny_pipe_21):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qwen_zero_prior.training.lora import add_lora, lora_parameters

    pipe = tiny_pipe_21
    frozen = {f"te.{n}": p.detach().clone() for n, p in pipe.text_encoder.state_dict().items()}
    frozen.update({f"vae.{n}": p.detach().clone() for n, p in pipe.vae.state_dict().items()})
    frozen.update({f"dit.{n}": p.detach().clone() for n, p in pipe.transformer.state_dict().items()})
    add_lora(pipe.transformer, 4, 4.0, families.get_family("qwen-image-2.1").default_lora_targets, seed=0)
    reg = _token(pipe, std=1e-5)
    lora = lora_parameters(pipe.transformer)
    lora_start = [p.detach().clone() for p in lora]
    vec_start = reg.vector.detach().clone()
    enc = PromptEncoder21(pipe, reg.token_id)
    x0 = flow21.encode_latents(pipe.vae, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ts, sigmas = flow21.sample_timesteps(scheduler, 1, "none", [torch.Generator().manual_seed(7)])
    assert 0 < float(sigmas) <= 1 and torch.allclose(ts.float(), sigmas.flatten() * 1000)
    opt = torch.optim.AdamW([{"params": lora, "lr": 1e-2, "weight_decay": 0.01},
                             {"params": [reg.vector], "lr": 1e-2, "weight_decay": 0.0}])
    pipe.transformer.train()
    losses = []
    for _ in range(6):  # same sample, noise and timestep: an overfit
        embeds, mask = enc.encode(["a photo of <zwx>"], torch.float32, CPU)
        loss = flow21.flow_matching_loss(pipe.transformer, x0, noise, ts, sigmas, embeds, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    assert (reg.vector.detach() - vec_start).abs().max() > 1e-4
    assert len(lora) == 2 * 14 and all((p.detach() - s).abs().max() > 0 for p, s in zip(lora, lora_start))
    current = {f"te.{n.replace('embed_tokens.base.', 'embed_tokens.')}": p
               for n, p in pipe.text_encoder.state_dict().items() if not n.endswith("embed_tokens.vector")}
    current.update({f"vae.{n}": p for n, p in pipe.vae.state_dict().items()})
    current.update({f"dit.{n.replace('.base_layer', '')}": p for n, p in pipe.transformer.state_dict().items()
                    if "lora_" not in n})
    assert set(current) == set(frozen)
    for n, p in frozen.items():
        assert torch.equal(current[n], p), n


def test_loss_refuses_mismatched_shapes(tiny_pipe_21):
    x0 = torch.zeros(1, 64, 1, 4, 4)
    with pytest.raises(flow21.LatentShapeError, match=r"latents \(1, 64, 1, 4, 4\) and noise \(1, 64, 1, 4, 6\)"):
        flow21.flow_matching_loss(tiny_pipe_21.transformer, x0, torch.zeros(1, 64, 1, 4, 6), torch.tensor([500.]),
                                  torch.tensor([0.5]), torch.zeros(1, 3, 32), None)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        flow21.sample_timesteps(tiny_pipe_21.scheduler, 3, "none", [None, None])
