import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_zero_prior.training.lora import (
    LoraError,
    add_lora,
    diffusers_to_kohya,
    effective_deltas,
    export_lora,
    kohya_to_diffusers,
    load_lora_into_pipeline,
)


def _forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(1, 16, 64, generator=g)
    enc = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=hs, encoder_hidden_states=enc, timestep=torch.tensor([0.5]),
                           img_shapes=[[(1, 4, 4)]], return_dict=False)[0]


def _trained_lora(pipe, alpha=8.0):
    add_lora(pipe.transformer, rank=4, alpha=alpha, targets=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                            "add_k_proj", "add_v_proj", "to_add_out"], seed=0)
    with torch.no_grad():  # make lora_B non-zero so the adapter changes the output
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return export_lora(pipe.transformer, rank=4, alpha=alpha)


def test_lora_covers_text_stream_and_loads_with_no_missing_keys(tiny_pipe, _tiny_pipe_session):
    import copy

    reference = copy.deepcopy(_tiny_pipe_session)
    base_out = _forward(reference.transformer)
    sd = _trained_lora(tiny_pipe, alpha=8.0)  # alpha != rank: the scale must be folded in
    trained_out = _forward(tiny_pipe.transformer)
    assert any(".add_q_proj." in k for k in sd) and any(".to_add_out." in k for k in sd)
    assert all(k.startswith("transformer.transformer_blocks.") for k in sd)

    report = load_lora_into_pipeline(reference, sd, scale=1.0)
    assert report == {"missing": [], "unexpected": []}
    loaded_out = _forward(reference.transformer)
    assert torch.allclose(loaded_out, trained_out, atol=1e-5)
    assert not torch.allclose(loaded_out, base_out, atol=1e-4)

    reference.set_adapters(["zero_prior"], adapter_weights=[0.0])
    assert torch.allclose(_forward(reference.transformer), base_out, atol=1e-6)


def test_unmatched_targets_refused(tiny_pipe):
    with pytest.raises(LoraError, match="match no module"):
        add_lora(tiny_pipe.transformer, 4, 4, ["to_q", "nonexistent_proj"])


def test_kohya_roundtrip(tiny_pipe, tmp_path):
    sd = _trained_lora(tiny_pipe, alpha=8.0)
    kohya = diffusers_to_kohya(sd, alpha=2.0)
    assert all(k.startswith("lora_unet_transformer_blocks_") for k in kohya)
    assert any(k.endswith(".alpha") for k in kohya) and any(k.endswith(".lora_down.weight") for k in kohya)
    assert "lora_unet_transformer_blocks_0_attn_add_q_proj.lora_up.weight" in kohya
    back = kohya_to_diffusers(kohya)
    assert set(back) == set(sd)
    d0, d1, d2 = effective_deltas(sd), effective_deltas(kohya), effective_deltas(back)
    assert set(d0) == set(d1) == set(d2)
    for k in d0:
        assert torch.allclose(d0[k], d1[k], atol=1e-6) and torch.allclose(d0[k], d2[k], atol=1e-6)


def test_cli_convert(tiny_pipe, tmp_path):
    from qwen_zero_prior.cli import main

    sd = _trained_lora(tiny_pipe)
    src = tmp_path / "d.safetensors"
    save_file(sd, src)
    assert main(["convert", str(src), str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(tmp_path / "k.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d2.safetensors")]) == 0
    back = load_file(tmp_path / "d2.safetensors")
    for k, v in effective_deltas(sd).items():
        assert torch.allclose(v, effective_deltas(back)[k], atol=1e-6)
    bad = tmp_path / "bad.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, bad)
    assert main(["convert", str(bad), str(tmp_path / "x.safetensors")]) == 2


# ---- key styles, the diffusers header alpha, convert -----------------------------------------------------


def _dreambooth_file(pipe, path, rank=4, alpha=8.0, **config):
    """A LoRA saved the way diffusers' train_dreambooth_lora_qwen_image.py saves it: peft adapter on the
    transformer, QwenImagePipeline.save_lora_weights with the LoraConfig as lora_adapter_metadata (alpha only there)."""
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_q", "to_v", "add_k_proj"],
                     **config)
    pipe.transformer.add_adapter(cfg)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    expected = _forward(pipe.transformer)
    layers = get_peft_model_state_dict(pipe.transformer)
    type(pipe).save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                 **_collate_lora_metadata({"transformer": pipe.transformer}))
    return expected


def test_dreambooth_header_alpha_is_applied(tiny_pipe, _tiny_pipe_session, tmp_path):
    import copy

    from safetensors import safe_open

    from qwen_zero_prior.training.lora import HEADER_METADATA_KEY, parse_lora, to_diffusers

    path = tmp_path / "db.safetensors"
    expected = _dreambooth_file(tiny_pipe, path, rank=4, alpha=8.0)
    sd = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert HEADER_METADATA_KEY in header and not any(k.endswith(".alpha") for k in sd)  # alpha only in the header

    parsed = parse_lora(sd, header)
    assert parsed.alpha_from_header and {a for _, _, a in parsed.modules.values()} == {8.0}
    folded = to_diffusers(sd, header)
    k = next(k for k in sd if k.endswith("lora_B.weight"))
    assert torch.equal(folded[k], sd[k] * 2)  # alpha / rank = 2

    core = copy.deepcopy(_tiny_pipe_session)  # the core's loader, with the header: the trained model
    assert load_lora_into_pipeline(core, sd, metadata=header) == {"missing": [], "unexpected": []}
    assert torch.allclose(_forward(core.transformer), expected, atol=1e-5)
    ref = copy.deepcopy(_tiny_pipe_session)  # diffusers itself, from the file
    ref.load_lora_weights(str(path))
    assert torch.allclose(_forward(ref.transformer), expected, atol=1e-5)
    blind = copy.deepcopy(_tiny_pipe_session)  # without the header: half the update (what the issue saw)
    load_lora_into_pipeline(blind, sd)
    assert not torch.allclose(_forward(blind.transformer), expected, atol=1e-4)


def test_header_alpha_pattern_and_rslora(tiny_pipe, _tiny_pipe_session, tmp_path):
    import copy

    from safetensors import safe_open

    for config in ({"alpha_pattern": {"to_v": 2.0}}, {"use_rslora": True}):
        pipe = copy.deepcopy(_tiny_pipe_session)
        path = tmp_path / f"db-{len(config)}-{next(iter(config))}.safetensors"
        expected = _dreambooth_file(pipe, path, rank=4, alpha=8.0, **config)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
        core = copy.deepcopy(_tiny_pipe_session)
        load_lora_into_pipeline(core, load_file(path), metadata=header)
        assert torch.allclose(_forward(core.transformer), expected, atol=1e-5), config


def _styled(sd, style, alpha=None):
    from qwen_zero_prior.training.lora import KEY_STYLES, parse_lora, write_lora

    return write_lora(parse_lora(sd), KEY_STYLES[style], alpha=alpha)


@pytest.mark.parametrize("style,example", [
    ("kohya", "lora_unet_transformer_blocks_0_attn_add_q_proj.lora_down.weight"),
    ("lycoris", "lycoris_transformer_blocks_0_attn_add_q_proj.lora_down.weight"),
    ("lightning", "transformer_blocks.0.attn.add_q_proj.lora_down.weight"),
    ("peft-default", "transformer_blocks.0.attn.add_q_proj.lora_A.default.weight"),
    ("comfyui", "diffusion_model.transformer_blocks.0.attn.add_q_proj.lora_down.weight"),
    ("comfyui-ab", "diffusion_model.transformer_blocks.0.attn.add_q_proj.lora_A.weight"),
    ("peft", "transformer_blocks.0.attn.add_q_proj.lora_A.weight"),
])
def test_every_key_style_loads_and_converts_back(tiny_pipe, _tiny_pipe_session, tmp_path, style, example):
    import copy

    from qwen_zero_prior.cli import main

    sd = _trained_lora(tiny_pipe, alpha=8.0)
    expected = _forward(tiny_pipe.transformer)
    styled = _styled(sd, style, alpha=2.0 if style in ("kohya", "lycoris", "lightning", "comfyui") else None)
    assert example in styled
    core = copy.deepcopy(_tiny_pipe_session)  # the core's loader takes the style as it is
    assert load_lora_into_pipeline(core, styled) == {"missing": [], "unexpected": []}
    assert torch.allclose(_forward(core.transformer), expected, atol=1e-5)

    src, mid, back = tmp_path / "src.safetensors", tmp_path / "d.safetensors", tmp_path / "back.safetensors"
    save_file(styled, src)
    assert main(["convert", str(src), str(mid)]) == 0
    assert all(k.startswith("transformer.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in load_file(mid))
    assert main(["convert", str(mid), str(back)]) == 0  # no --to: back to the source's style, alpha and all
    restored = load_file(back)
    assert set(restored) == set(styled)
    for k, v in styled.items():
        assert torch.allclose(restored[k].float(), v.float(), atol=1e-6), k


def test_cli_convert_weights_zip_and_alpha(tiny_pipe, tmp_path):
    from qwen_zero_prior.cli import main
    from qwen_zero_prior.training.archive import ArchiveMeta, write_archive

    sd = _trained_lora(tiny_pipe, alpha=8.0)
    meta = ArchiveMeta(base_model="x", placeholder_token=None, placeholder_token_id=None, rank=4,
                       created=ArchiveMeta.now())
    arc = write_archive(tmp_path / "weights.zip", meta, sd)
    out = tmp_path / "k" / "k.safetensors"  # a missing output folder is created
    assert main(["convert", str(arc), str(out), "--alpha", "2"]) == 0
    kohya = load_file(out)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    for k, v in effective_deltas(sd).items():
        assert torch.allclose(effective_deltas(kohya)[k], v, atol=1e-6)


def _one_error_line(capsys, argv) -> str:
    from qwen_zero_prior.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_convert_errors_are_one_line(tiny_pipe, tmp_path, capsys):
    sd = _trained_lora(tiny_pipe)
    out = str(tmp_path / "o.safetensors")
    assert "no such file" in _one_error_line(capsys, ["convert", str(tmp_path / "missing.safetensors"), out])
    (tmp_path / "c.yaml").write_text("train: {}\n")
    assert "neither a LoRA .safetensors file nor a weights archive" in _one_error_line(
        capsys, ["convert", str(tmp_path / "c.yaml"), out])
    cases = {
        "LoKr": {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(2, 2),
                 "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": torch.zeros(2, 2)},
        "LoHa": {"lycoris_transformer_blocks_0_attn_to_q.hada_w1_a": torch.zeros(2, 2)},
        "diff/diff_b": {"diffusion_model.transformer_blocks.0.attn.norm_q.diff": torch.zeros(2),
                        "diffusion_model.transformer_blocks.0.attn.to_q.diff_b": torch.zeros(2),
                        "diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(2, 1),
                        "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(1, 2)},
        "not a Qwen-Image LoRA key": {"foo.weight": torch.zeros(2)},
        "mixes LoRA key styles": {**sd, **{k: v.clone() for k, v in _styled(sd, "kohya").items()}},
    }
    for needle, tensors in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file(tensors, path)
        assert needle in _one_error_line(capsys, ["convert", str(path), out]), needle
    save_file(sd, tmp_path / "good.safetensors")
    assert "carry no alpha" in _one_error_line(capsys, ["convert", str(tmp_path / "good.safetensors"), out, "--to",
                                                        "diffusers", "--alpha", "2"])
    assert not (tmp_path / "o.safetensors").exists()
