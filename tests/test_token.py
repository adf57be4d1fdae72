import logging

import pytest
import torch

from qwen_zero_prior.training.token import (
    PlaceholderEmbedding,
    TokenError,
    add_placeholder_token,
    check_single_id,
    encode_ids,
    install_placeholder,
    materialize,
)

ZWX = 151665


def test_registered_id_and_reference_prompt(tokenizer):
    assert len(tokenizer) == 151665
    assert add_placeholder_token(tokenizer, "<zwx>") == ZWX
    assert encode_ids(tokenizer, "a photo of <zwx>") == [64, 6548, 315, 220, ZWX]


@pytest.mark.parametrize(
    "text, positions",
    [
        ("<zwx> on a beach", [0]),  # start
        ("a photo of <zwx> on a beach", [4]),  # middle
        ("a photo of <zwx>", [4]),  # end
        ("<zwx> and <zwx>", [0, 3]),  # repeated
        ("<zwx>, <zwx>.<zwx>!", [0, 3, 5]),  # next to punctuation
        ("(<zwx>)", [1]),
    ],
)
def test_token_is_one_id_everywhere(tokenizer, text, positions):
    add_placeholder_token(tokenizer, "<zwx>")
    ids = encode_ids(tokenizer, text)
    assert [i for i, t in enumerate(ids) if t == ZWX] == positions
    # nothing else in the text turned into the new id, and the rest tokenizes as before
    assert tokenizer.decode(ids) == text


def test_existing_tokens_refused(tokenizer):
    with pytest.raises(TokenError, match="already a special token"):
        add_placeholder_token(tokenizer, "<|im_start|>")
    with pytest.raises(TokenError, match="regular vocabulary entry"):
        add_placeholder_token(tokenizer, "hello")
    add_placeholder_token(tokenizer, "<zwx>")
    with pytest.raises(TokenError, match="already a special token"):
        add_placeholder_token(tokenizer, "<zwx>")


def test_multi_id_token_warns_naming_ids(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior"):
        assert check_single_id(tokenizer, "zwx") is None
    ids = encode_ids(tokenizer, "zwx")
    assert len(ids) > 1
    assert str(ids) in caplog.text and "'zwx'" in caplog.text


def test_table_never_shrunk_and_row_initialised(tiny_pipe):
    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    before = te.get_input_embeddings().weight.detach().clone()
    assert before.shape[0] == 152064
    reg = install_placeholder(tok, te, "<zwx>", init_std=0.0)
    assert reg.token_id == ZWX
    assert te.get_input_embeddings().weight.shape[0] == 152064  # not shrunk to len(tokenizer)
    assert torch.equal(reg.vector.detach(), torch.zeros(before.shape[1]))
    ids = torch.tensor([[64, ZWX, 315]])
    out = te.get_input_embeddings()(ids)
    assert torch.equal(out[0, 1], torch.zeros(before.shape[1]))
    assert torch.equal(out[0, 0], before[64]) and torch.equal(out[0, 2], before[315])


def test_init_std_scale(tiny_pipe):
    gen = torch.Generator().manual_seed(0)
    reg = install_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zwx>", init_std=1e-5, generator=gen)
    std = reg.vector.detach().std().item()
    assert 3e-6 < std < 3e-5


def test_grows_table_only_past_end(tokenizer):
    from qwen_zero_prior.training.tiny import tiny_text_encoder

    te = tiny_text_encoder(vocab_rows=151000)  # smaller than the tokenizer: the new id is past the end
    reg = install_placeholder(tokenizer, te, "<zwx>", init_std=0.0)
    assert te.get_input_embeddings().weight.shape[0] == reg.token_id + 1


def test_vector_width_mismatch(tiny_pipe):
    with pytest.raises(TokenError, match="embedding width is 32"):
        install_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zwx>", torch.zeros(3584), fresh=False)


def test_materialize_writes_row_only(tiny_pipe):
    te = tiny_pipe.text_encoder
    before = te.get_input_embeddings().weight.detach().clone()
    vec = torch.full((before.shape[1],), 0.25)
    reg = install_placeholder(tiny_pipe.tokenizer, te, "<zwx>", vec)
    assert isinstance(te.get_input_embeddings(), PlaceholderEmbedding)
    materialize(te)
    after = te.get_input_embeddings().weight.detach()
    assert not isinstance(te.get_input_embeddings(), PlaceholderEmbedding)
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [reg.token_id]
    assert torch.equal(after[reg.token_id], vec)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_prompt_encoder_matches_pipeline_and_its_gradient(tiny_pipe, prefix_cache):
    from qwen_zero_prior.training.prompt import PromptEncoder

    reg = install_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zwx>", torch.randn(32))
    caps = ["a photo of <zwx> on a plain background", "<zwx>", "a dog and <zwx>, <zwx>!", "no token here"]
    cpu = torch.device("cpu")
    ref, ref_mask = tiny_pipe._get_qwen_prompt_embeds(caps, device=cpu, dtype=torch.float32)
    ref.pow(2).sum().backward()
    ref_grad = reg.vector.grad.clone()
    reg.vector.grad = None
    enc = PromptEncoder(tiny_pipe, reg.token_id, prefix_cache=prefix_cache)
    for _ in range(2):  # the second pass reuses the cached prefixes
        got, mask = enc.encode(caps, torch.float32, cpu)
        assert torch.equal(mask, ref_mask)
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    reg.vector.grad = None
    got.pow(2).sum().backward()
    assert torch.allclose(reg.vector.grad, ref_grad, rtol=1e-4, atol=1e-5)
