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
