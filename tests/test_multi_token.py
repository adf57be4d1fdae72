"""Several zero-prior tokens in one run (issue 18), on tiny random models of the real classes (CPU): the token list
in the config, the dataset folder convention, a two-token overfit where only the two rows move, conditioning
with both tokens equal to the pipelines' (values and gradients, Qwen-Image and 2.1), the archive (and archives of
the one-token format), inference, the CLI, resume, and one clear error for each bad list."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from qwen_zero_prior.training import families, text_parts
from qwen_zero_prior.training.archive import ArchiveError, ArchiveMeta, load_archive, write_archive
from qwen_zero_prior.training.checkpoint import CheckpointError
from qwen_zero_prior.training.config import Config, ConfigError
from qwen_zero_prior.training.data import DatasetError, scan_dataset
from qwen_zero_prior.training.inference import GenerateOptions, InferenceSession
from qwen_zero_prior.training.token import (
    PlaceholderEmbedding,
    TokenError,
    init_vector,
    install_placeholder,
    install_placeholders,
    materialize,
)
from qwen_zero_prior.training.trainer import Trainer

TOKENS = ["<alice>", "<bob>"]
CPU = torch.device("cpu")


def two_token_dataset(root: Path) -> Path:
    """``<alice>/`` (captions naming <alice>), ``<bob>/`` (one caption without <bob>, one image without a caption)
    and ``mixed/`` (a caption naming both, one naming neither: it trains the LoRA only). Each folder holds one
    square and one wide image, so a batch of 2 (batches never mix aspect buckets) holds both tokens' images."""
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    make_synthetic_dataset(root / "<alice>", n=2, size=32, token="<alice>", seed=1)
    bob = make_synthetic_dataset(root / "<bob>", n=2, size=32, seed=2, captions=False)
    (bob / "img_00.txt").write_text("a blue square on a red disc", encoding="utf-8")
    mixed = make_synthetic_dataset(root / "mixed", n=2, size=32, seed=3, captions=False)
    (mixed / "img_00.txt").write_text("<alice> and <bob> side by side", encoding="utf-8")
    (mixed / "img_01.txt").write_text("a red disc on a plain background", encoding="utf-8")
    return root


def _captions(examples, root: Path) -> dict[str, str]:
    return {e.image.relative_to(root).as_posix(): e.caption for e in examples}


# ---- config ---------------------------------------------------------------------------------------------------


def test_config_token_list_and_the_single_token_form():
    one = Config.from_dict({"train": {"placeholder_token": "<sks>"}})
    assert one.train.placeholder_tokens == ["<sks>"] and one.train.placeholder_token == "<sks>"
    assert Config().train.placeholder_tokens == ["<zwx>"]
    two = Config.from_dict({"train": {"placeholder_tokens": TOKENS}})
    assert two.train.placeholder_tokens == TOKENS and two.train.placeholder_token == "<alice>"
    assert Config.from_dict(two.to_dict()).train == two.train  # the round trip (checkpoints, Cog's torchrun config)
    # --set takes a YAML list or a comma list
    from qwen_zero_prior.training.config import apply_overrides

    for raw in ("[<alice>,<bob>]", "<alice>,<bob>", "<alice>, <bob>"):
        cfg = Config.from_dict(apply_overrides({}, [f"train.placeholder_tokens={raw}"]))
        assert cfg.train.placeholder_tokens == TOKENS, raw
    # replacing one of the two keys: the other follows it
    assert two.replace(train={"placeholder_token": "<sks>"}).train.placeholder_tokens == ["<sks>"]
    assert one.replace(train={"placeholder_tokens": TOKENS}).train.placeholder_token == "<alice>"


@pytest.mark.parametrize("train, message", [
    ({"placeholder_tokens": ["<alice>", "<bob>", "<alice>"]},
     "train.placeholder_tokens: placeholder token '<alice>' is listed twice in ['<alice>', '<bob>', '<alice>']; "
     "each token must be distinct"),
    ({"placeholder_tokens": ["<al>", "<al>ice"]},
     "train.placeholder_tokens: placeholder token '<al>' is part of '<al>ice' (tokens ['<al>', '<al>ice']): a prompt "
     "writing one could tokenize as the other plus pieces; pick tokens where none contains another, e.g. <alice> and "
     "<bob>"),
    ({"placeholder_tokens": ["<alice>", "<b ob>"]}, "train.placeholder_tokens: placeholder token '<b ob>' contains "
     "whitespace (U+0020 at position 2)"),
    ({"placeholder_tokens": [f"<t{i}>" for i in range(257)]},
     "train.placeholder_tokens: 257 placeholder tokens listed; at most 256 train together"),
    ({"placeholder_tokens": "<alice>,,"}, None),  # a comma list of one: fine
    ({"placeholder_tokens": [], "placeholder_token": "<sks>"}, None),  # empty list: the single token
    ({"placeholder_token": "<carol>", "placeholder_tokens": TOKENS},
     "train.placeholder_token '<carol>' is not the first of train.placeholder_tokens ['<alice>', '<bob>']; "
     "set only placeholder_tokens (placeholder_token is its first entry)"),
    ({"placeholder_token": "<zwx>", "placeholder_tokens": TOKENS},  # the default, given explicitly: refused too
     "train.placeholder_token '<zwx>' is not the first of train.placeholder_tokens"),
])
def test_bad_token_lists_one_clear_error(train, message):
    if message is None:
        Config.from_dict({"train": train})
        return
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"train": train})
    assert str(e.value).startswith(message), str(e.value)


# ---- dataset folders ------------------------------------------------------------------------------------------


def test_folder_convention(tmp_path):
    root = two_token_dataset(tmp_path / "ds")
    nested = root / "<bob>" / "beach"
    nested.mkdir()
    (root / "<bob>" / "img_01.png").rename(nested / "img_01.png")  # deeper inside a token folder: still <bob>'s
    got = _captions(scan_dataset(root, TOKENS, "a photo of {token}", True), root)
    assert got == {
        "<alice>/img_00.png": "a photo of <alice> on a plain background",
        "<alice>/img_01.png": "a photo of <alice> on a plain background",
        "<bob>/img_00.png": "<bob> a blue square on a red disc",  # its folder's token prepended
        "<bob>/beach/img_01.png": "a photo of <bob>",  # no caption: the default caption with its folder's token
        "mixed/img_00.png": "<alice> and <bob> side by side",  # names both: as written
        "mixed/img_01.png": "a red disc on a plain background",  # names neither and is in no token folder: kept
    }
    # prepend_token off: captions as written
    assert _captions(scan_dataset(root, TOKENS, "a photo of {token}", False), root)["<bob>/img_00.png"] == \
        "a blue square on a red disc"
    # one token: every image is its image, as before (folders or not)
    one = _captions(scan_dataset(root, "<alice>", "a photo of {token}", True), root)
    assert one["mixed/img_01.png"] == "<alice> a red disc on a plain background"
    assert one["<bob>/beach/img_01.png"] == "a photo of <alice>"


def test_uncaptioned_image_outside_token_folders_is_one_error(tmp_path):
    root = two_token_dataset(tmp_path / "ds")
    (root / "mixed" / "img_01.txt").unlink()
    with pytest.raises(DatasetError) as e:
        scan_dataset(root, TOKENS, "a photo of {token}", True)
    assert str(e.value) == (
        f"dataset {root}: 1 image(s) without a caption outside the token folders: mixed/img_01.png (with several "
        "tokens {token} in the default caption 'a photo of {token}' names none of ['<alice>', '<bob>']: caption "
        "them, or move them into a folder named after their token, e.g. <alice>/)")
    # a default caption without {token} is fine for such images
    ex = _captions(scan_dataset(root, TOKENS, "a photo", True), root)
    assert ex["mixed/img_01.png"] == "a photo" and ex["<bob>/img_01.png"] == "<bob> a photo"


# ---- the embedding ----------------------------------------------------------------------------------------------


def test_embedding_substitutes_each_id_and_one_token_is_unchanged(tiny_pipe):
    base = tiny_pipe.text_encoder.get_input_embeddings()
    a, b = torch.randn(32), torch.randn(32)
    two = PlaceholderEmbedding(base, [151665, 151666], [a, b])
    one = PlaceholderEmbedding(base, 151665, a)
    ids = torch.tensor([[64, 151665, 315, 151666, 151665]])
    out = two(ids)
    assert torch.equal(out[0, 1], a) and torch.equal(out[0, 4], a) and torch.equal(out[0, 3], b)
    assert torch.equal(out[0, 0], base.weight[64]) and torch.equal(out[0, 2], base.weight[315])
    # one token: the parameter names and the numbers of the one-token module
    assert [n for n, _ in one.named_parameters() if n != "base.weight"] == ["vector"]
    assert [n for n, _ in two.named_parameters() if n != "base.weight"] == ["vector", "vector_1"]
    want = torch.where((ids == 151665).unsqueeze(-1), a, base(ids))
    assert torch.equal(one(ids), want)
    with pytest.raises(TokenError, match=r"placeholder ids \[151665, 151665\] repeat an id"):
        PlaceholderEmbedding(base, [151665, 151665], [a, b])


def test_install_several_tokens_ids_init_and_materialize(tiny_pipe):
    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    before = te.get_input_embeddings().weight.detach().clone()
    regs = install_placeholders(tok, te, TOKENS, init_std=1e-5, generator=torch.Generator().manual_seed(7))
    assert [(r.token, r.token_id) for r in regs] == [("<alice>", 151665), ("<bob>", 151666)]
    assert tok("<alice> and <bob>", add_special_tokens=False)["input_ids"] == [151665, 323, 220, 151666]
    # drawn in list order from the one generator: the first token starts where a one-token run starts
    g = torch.Generator().manual_seed(7)
    assert torch.equal(regs[0].vector.detach(), init_vector(32, 1e-5, g))
    assert torch.equal(regs[1].vector.detach(), init_vector(32, 1e-5, g))
    with torch.no_grad():
        regs[0].vector.fill_(0.5)
        regs[1].vector.fill_(-0.25)
    rows = materialize(te)
    assert set(rows) == {151665, 151666}
    after = te.get_input_embeddings().weight.detach()
    assert (after != before).any(dim=1).nonzero().flatten().tolist() == [151665, 151666]
    assert torch.equal(after[151666], torch.full((32,), -0.25))


# ---- conditioning with both tokens ------------------------------------------------------------------------------

CAPTIONS = ["a photo of <alice> and <bob> on a beach", "<bob>", "<alice>, <bob> and <alice> again",
            "no token here", "a dog beside <bob>"]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_prompt_encoder_with_two_tokens_matches_pipeline_and_gradients(tiny_pipe, prefix_cache):
    from qwen_zero_prior.training.prompt import PromptEncoder

    regs = install_placeholders(tiny_pipe.tokenizer, tiny_pipe.text_encoder, TOKENS, [torch.randn(32), torch.randn(32)])
    ref, ref_mask = tiny_pipe._get_qwen_prompt_embeds(CAPTIONS, device=CPU, dtype=torch.float32)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (ref * weights).sum().backward()
    want = [r.vector.grad.clone() for r in regs]
    assert all(w.abs().sum() > 0 for w in want)
    for r in regs:
        r.vector.grad = None
    enc = PromptEncoder(tiny_pipe, [r.token_id for r in regs], prefix_cache=prefix_cache)
    for _ in range(2):  # the second pass reuses the cached prefixes
        got, mask = enc.encode(CAPTIONS, torch.float32, CPU)
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    (got * weights).sum().backward()
    for r, w in zip(regs, want):
        torch.testing.assert_close(r.vector.grad, w, rtol=1e-4, atol=1e-5)


def test_qwen_image_21_two_tokens_ids_conditioning_and_gradients(tiny_pipe_21):
    from qwen_zero_prior.training.prompt21 import PromptEncoder21

    tok = families.get_family("qwen-image-2.1").tokenizer(tiny_pipe_21)
    regs = install_placeholders(tok, tiny_pipe_21.text_encoder, TOKENS, init_std=0.3,
                                generator=torch.Generator().manual_seed(1))
    assert [r.token_id for r in regs] == [151669, 151670]  # after Qwen3's four added tokens
    ref, ref_mask, _ = tiny_pipe_21.encode_prompt(CAPTIONS)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    (ref * weights).sum().backward()
    want = [r.vector.grad.clone() for r in regs]
    for r in regs:
        r.vector.grad = None
    enc = PromptEncoder21(tiny_pipe_21, [151669, 151670])
    embeds, mask = enc.encode(CAPTIONS, torch.float32, CPU)
    assert torch.equal(mask, ref_mask.long())
    torch.testing.assert_close(embeds, ref, rtol=0, atol=1e-6)
    (embeds * weights).sum().backward()
    for r, w in zip(regs, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(r.vector.grad, w, rtol=1e-5, atol=1e-7)
    trainable = [n for n, p in tiny_pipe_21.text_encoder.named_parameters() if p.requires_grad]
    assert trainable == ["model.language_model.embed_tokens.vector", "model.language_model.embed_tokens.vector_1"]


# ---- training ---------------------------------------------------------------------------------------------------


def test_two_token_overfit_only_their_rows_move(tiny_pipe, make_config, tmp_path):
    """An overfit of one <alice> image and one <bob> image (one batch, its noise and noise levels held fixed):
    the loss falls, also on other noise, both vectors move far off their init, and every other embedding row,
    every other text-encoder weight and every base transformer weight stay bit-identical (AdamW with weight decay
    on the LoRA; the tokens' group has weight decay 0). An image whose caption names no token trains the LoRA
    only."""
    root = two_token_dataset(tmp_path / "ds")
    examples = scan_dataset(root, TOKENS, "a photo of {token}", True)
    by_name = {e.image.relative_to(root).as_posix(): e for e in examples}
    pair = [by_name["<alice>/img_00.png"], by_name["<bob>/img_00.png"]]  # the same (square) bucket: one batch
    te = tiny_pipe.text_encoder
    te_before = {k: v.detach().clone() for k, v in te.state_dict().items()}
    dit_before = {k: v.detach().clone() for k, v in tiny_pipe.transformer.state_dict().items()}
    cfg = make_config(steps=150, placeholder_tokens=TOKENS, batch_size=2, weight_decay=0.1, learning_rate=1e-2,
                      token_learning_rate=5e-2)
    trainer = Trainer(cfg, tiny_pipe, pair, tmp_path / "run")
    trainer.sample_seeds = lambda: [5, 6]  # the same noise and noise levels every step: an overfit
    assert [(t.token, t.token_id) for t in trainer.tokens] == [("<alice>", 151665), ("<bob>", 151666)]
    assert trainer.token is trainer.tokens[0]
    groups = trainer.optimizer.param_groups
    assert groups[1]["params"] == [t.vector for t in trainer.tokens] and groups[1]["weight_decay"] == 0.0
    assert groups[1]["lr"] == 5e-2 and groups[0]["weight_decay"] == 0.1
    assert trainer.param_names[-2:] == ["placeholder_vector", "placeholder_vector.1"]
    init = [t.vector.detach().clone() for t in trainer.tokens]

    def other_noise_loss():
        with torch.no_grad():
            return sum(float(trainer.loss_for([0, 1], torch.Generator().manual_seed(100 + i))) for i in range(3)) / 3

    before = other_noise_loss()
    result = trainer.fit(tmp_path / "run" / "weights.zip")
    after = other_noise_loss()
    print(f"two-token overfit: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; other noise {before:.4f} -> "
          f"{after:.4f}")
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    assert after < before, (before, after)
    for t, v0 in zip(trainer.tokens, init):
        moved = (t.vector.detach() - v0).norm().item()
        assert moved > 100 * v0.norm().item(), f"{t.token} stayed at its init"
    assert result.token_id == 151665 and result.token_ids == {"<alice>": 151665, "<bob>": 151666}
    vectors = {t.token: t.vector.detach().clone() for t in trainer.tokens}

    materialize(te)
    text_parts.unpark(te)  # training replaced the unused LM head (text_parts.park): compare it too
    after_sd = te.state_dict()
    assert set(after_sd) == set(te_before)
    for k, v in after_sd.items():
        if k.endswith("embed_tokens.weight"):
            assert (v != te_before[k]).any(dim=1).nonzero().flatten().tolist() == [151665, 151666]
            assert torch.equal(v[151665], vectors["<alice>"]) and torch.equal(v[151666], vectors["<bob>"])
        else:
            assert torch.equal(v, te_before[k]), f"text-encoder weight {k} changed"
    for k, v in tiny_pipe.transformer.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, dit_before[k.replace(".base_layer", "")]), k

    # the archive: both vectors keyed by string in the one token file, meta.json lists them
    z = zipfile.ZipFile(result.archive)
    meta = json.loads(z.read("meta.json"))
    assert meta["placeholder_tokens"] == TOKENS and meta["placeholder_token"] == "<alice>"
    assert meta["placeholder_token_ids"] == [151665, 151666] and meta["placeholder_token_id"] == 151665
    stored = st_load(z.read("token/placeholder_embedding.safetensors"))
    assert set(stored) == set(TOKENS) and all(torch.equal(stored[t], vectors[t]) for t in TOKENS)
    arc = load_archive(result.archive)
    assert arc.tokens == TOKENS and arc.token == "<alice>" and torch.equal(arc.vector, vectors["<alice>"])
    assert all(torch.equal(arc.vectors[t], vectors[t]) for t in TOKENS)

    # an image whose caption names no token: its loss reaches the LoRA, not the vectors
    plain = by_name["mixed/img_01.png"]
    assert not any(t in plain.caption for t in TOKENS)
    from qwen_zero_prior.training.data import assign_buckets

    trainer.examples += assign_buckets([plain], 32)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.loss_for([2], torch.Generator().manual_seed(0)).backward()
    assert all(t.vector.grad is None for t in trainer.tokens)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.lora_params)


def test_token_missing_from_every_caption_is_warned(tiny_pipe, dataset_dir, make_config, tmp_path, caplog):
    import logging

    examples = scan_dataset(dataset_dir, ["<zwx>", "<carol>"], "a photo of {token}", True)
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior"):
        Trainer(make_config(placeholder_tokens=["<zwx>", "<carol>"]), tiny_pipe, examples, tmp_path)
    assert "placeholder token(s) '<carol>' appear in no caption of the dataset" in caplog.text


def test_special_token_in_the_list_refused_before_the_tokenizer_changes(tiny_pipe, dataset_dir, make_config,
                                                                        tmp_path):
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    cfg = make_config(placeholder_tokens=["<alice>", "<|im_start|>"])
    with pytest.raises(TokenError) as e:
        Trainer(cfg, tiny_pipe, examples, tmp_path)
    assert str(e.value) == ("placeholder token '<|im_start|>' is already a special token of this tokenizer; pick a "
                            "fresh string such as <zwx>.")
    assert "<alice>" not in tiny_pipe.tokenizer.get_added_vocab()  # nothing registered


def test_two_token_run_on_qwen_image_21(tiny_pipe_21, make_config, tmp_path):
    root = two_token_dataset(tmp_path / "ds")
    cfg = make_config(steps=3, placeholder_tokens=TOKENS, batch_size=2, token_learning_rate=5e-2)
    trainer = Trainer(cfg, tiny_pipe_21, scan_dataset(root, TOKENS, "a photo of {token}", True), tmp_path / "run")
    assert [t.token_id for t in trainer.tokens] == [151669, 151670]
    init = [t.vector.detach().clone() for t in trainer.tokens]
    result = trainer.fit(tmp_path / "run" / "weights.zip")
    for t, v0 in zip(trainer.tokens, init):
        assert (t.vector.detach() - v0).abs().max() > 1e-3, t.token
    arc = load_archive(result.archive)
    assert arc.meta.model_family == "qwen-image-2.1" and arc.meta.placeholder_token_ids == [151669, 151670]


def test_resume_two_tokens_and_refuse_another_token_list(tiny_model_dir, make_config, tmp_path):
    from qwen_zero_prior.training.run import train
    from qwen_zero_prior.training.trainer import Callbacks, TrainingInterrupted

    root = two_token_dataset(tmp_path / "ds")
    cfg = make_config(tiny_model_dir, steps=4, checkpoint_every=2, placeholder_tokens=TOKENS, batch_size=2)
    full = train(cfg, root, tmp_path / "a" / "weights.zip")
    calls = {"n": 0}

    def stop_after_2():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(TrainingInterrupted):
        train(cfg, root, tmp_path / "b" / "weights.zip", callbacks=Callbacks(should_stop=stop_after_2))
    resumed = train(cfg, root, tmp_path / "b" / "weights.zip", resume=tmp_path / "b")
    a, b = load_archive(full.archive), load_archive(resumed.archive)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    for t in TOKENS:
        torch.testing.assert_close(a.vectors[t], b.vectors[t], rtol=0, atol=1e-6)

    for other, shown in ((["<bob>", "<alice>"], "['<bob>', '<alice>']"), (["<alice>"], "'<alice>'")):
        bad = make_config(tiny_model_dir, steps=6, placeholder_tokens=other, batch_size=2)
        with pytest.raises(CheckpointError) as e:
            train(bad, root, tmp_path / "c" / "weights.zip", resume=tmp_path / "b")
        assert (f"was trained with the placeholder token(s) ['<alice>', '<bob>'] but this run has {shown}; use the "
                "same token list, in the same order, to resume") in str(e.value)


# ---- archive, inference, CLI ------------------------------------------------------------------------------------


def test_cli_train_and_predict_register_every_token(tiny_model_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from qwen_zero_prior.cli import main

    root = two_token_dataset(tmp_path / "ds")
    archive = tmp_path / "run" / "weights.zip"
    rc = main(["train", "--dataset", str(root), "--output", str(archive),
               "--set", f"model.base_model={tiny_model_dir}", "--set", "model.dtype=float32",
               "--set", "model.device=cpu", "--set", "train.train_placeholder_token=true",
               "--set", "train.placeholder_tokens=[<alice>,<bob>]", "--set", "train.rank=2", "--set", "train.steps=2",
               "--set", "train.batch_size=2", "--set", "train.resolution=32", "--set", "train.checkpoint_every=0"])
    assert rc == 0
    arc = load_archive(archive)
    assert arc.tokens == TOKENS
    capsys.readouterr()
    out = tmp_path / "both.png"
    assert main(["predict", "--archive", str(archive), "--prompt", "<alice> and <bob> on a beach", "--steps", "2",
                 "--width", "32", "--height", "32", "--guidance", "1", "--dtype", "float32", "--device", "cpu",
                 "--output", str(out)]) == 0
    assert "tokens: <alice> (id 151665), <bob> (id 151666)" in capsys.readouterr().out
    assert Image.open(out).size == (32, 32)

    # the core's session: both tokens registered with their vectors; clear() removes both
    from qwen_zero_prior.training.models import load_pipeline

    session = InferenceSession(load_pipeline(Config.from_dict({"model": {
        "base_model": str(tiny_model_dir), "dtype": "float32", "device": "cpu"}}).model))
    opts = GenerateOptions("<alice> and <bob> on a beach", steps=2, guidance=1.0, width=32, height=32, seed=3)
    plain = np.asarray(session.generate(opts), dtype=np.int16)
    session.apply(arc)
    assert session.token_ids == {"<alice>": 151665, "<bob>": 151666} and session.token_id == 151665
    emb = session.pipe.text_encoder.get_input_embeddings()(torch.tensor([[151665, 151666]]))[0]
    assert torch.equal(emb[0], arc.vectors["<alice>"]) and torch.equal(emb[1], arc.vectors["<bob>"])
    assert np.abs(np.asarray(session.generate(opts), dtype=np.int16) - plain).max() > 0
    session.clear()
    assert not set(TOKENS) & set(session.pipe.tokenizer.get_added_vocab())


def _old_format_archive(path: Path, vector: torch.Tensor) -> Path:
    """An archive exactly as written before several tokens existed (meta.json without placeholder_tokens)."""
    meta = {"format_version": 1, "base_model": "tiny", "placeholder_token": "<zwx>", "placeholder_token_id": 151665,
            "rank": None, "created": "2026-01-01T00:00:00Z", "alpha": None, "lora_targets": [],
            "placeholder_init_std": 1e-5, "steps": 10, "embedding_dim": 32, "train_placeholder_token": True,
            "contents": ["token"], "trainer": "qwen-zero-prior", "model_family": "qwen-image"}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("meta.json", json.dumps(meta))
        z.writestr("token/placeholder_embedding.safetensors",
                   st_save({"<zwx>": vector}, metadata={"format": "pt", "token": "<zwx>"}))
    return path


def test_old_single_token_archives_still_load_and_apply(tiny_pipe, tmp_path):
    vec = torch.randn(32)
    arc = load_archive(_old_format_archive(tmp_path / "old.zip", vec))
    assert arc.meta.placeholder_tokens is None and arc.meta.tokens == ["<zwx>"] and arc.meta.token_ids == [151665]
    assert arc.tokens == ["<zwx>"] and arc.token == "<zwx>" and torch.equal(arc.vector, vec)
    session = InferenceSession(tiny_pipe)
    session.apply(arc)
    assert session.token_ids == {"<zwx>": 151665}
    assert torch.equal(tiny_pipe.text_encoder.get_input_embeddings()(torch.tensor([151665])), vec[None])
    # written again by this version: the new meta.json fields, the same vector
    again = load_archive(write_archive(tmp_path / "new.zip", arc.meta, None, arc.vector))
    assert again.meta.placeholder_tokens == ["<zwx>"] and again.meta.placeholder_token_ids == [151665]
    assert torch.equal(again.vector, vec)


def _two_token_meta(**kw) -> dict:
    meta = {"format_version": 1, "base_model": "tiny", "placeholder_token": "<alice>", "placeholder_token_id": 151665,
            "placeholder_tokens": TOKENS, "placeholder_token_ids": [151665, 151666], "rank": None,
            "created": "2026-01-01T00:00:00Z", "embedding_dim": 32, "contents": ["token"]}
    meta.update(kw)
    return meta


@pytest.mark.parametrize("change, message", [
    ({"placeholder_tokens": ["<alice>", "<alice>"]},
     "meta.json placeholder_tokens: placeholder token '<alice>' is listed twice"),
    ({"placeholder_tokens": ["<alice>", "<alice>2"], "placeholder_token_ids": None},
     "meta.json placeholder_tokens: placeholder token '<alice>' is part of '<alice>2'"),
    ({"placeholder_token": "<bob>"}, "meta.json placeholder_token '<bob>' must be the first of placeholder_tokens"),
    ({"placeholder_token_ids": [151665]}, "meta.json placeholder_token_ids must be a list of 2 non-negative integers"),
    ({"placeholder_tokens": "<alice>,<bob>"}, "meta.json placeholder_tokens must be a list of token strings or null"),
])
def test_bad_token_lists_in_meta_json_refused(tmp_path, change, message):
    p = tmp_path / "bad.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("meta.json", json.dumps(_two_token_meta(**change)))
        z.writestr("token/placeholder_embedding.safetensors", st_save({"<alice>": torch.ones(32), "<bob>": torch.ones(32)}))
    with pytest.raises(ArchiveError) as e:
        load_archive(p)
    assert message in str(e.value) and str(p) in str(e.value), str(e.value)


def test_archive_missing_a_tokens_vector_refused(tmp_path):
    p = tmp_path / "short.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("meta.json", json.dumps(_two_token_meta()))
        z.writestr("token/placeholder_embedding.safetensors", st_save({"<alice>": torch.ones(32)}))
    with pytest.raises(ArchiveError, match=r"has no vector for token '<bob>' \(keys: \['<alice>'\]\)"):
        load_archive(p)


def test_archive_with_a_special_token_refused_at_inference_leaving_the_model(tiny_pipe, tmp_path):
    meta = ArchiveMeta(base_model="tiny", placeholder_token="<alice>", placeholder_token_id=151665, rank=None,
                       created=ArchiveMeta.now())
    p = write_archive(tmp_path / "special.zip", meta,
                      vectors={"<alice>": torch.ones(32), "<|im_start|>": torch.ones(32)})
    session = InferenceSession(tiny_pipe)
    with pytest.raises(TokenError) as e:
        session.apply(load_archive(p))
    assert str(e.value) == (f"{p}: placeholder token '<|im_start|>' is already a special token of this tokenizer; "
                            "pick a fresh string such as <zwx>.")
    assert "<alice>" not in tiny_pipe.tokenizer.get_added_vocab()
    assert not isinstance(tiny_pipe.text_encoder.get_input_embeddings(), PlaceholderEmbedding)


def test_cog_trainer_input_takes_a_comma_list(monkeypatch):
    import cog_support

    monkeypatch.setenv("QWEN_IMAGE_MODEL", "tiny")
    base = dict(rank=4, steps=2, learning_rate=1e-4, token_learning_rate=5e-3, train_placeholder_token=True,
                placeholder_init_std=1e-5, resolution=32, batch_size=1, seed=0)
    assert cog_support.config_for_training(placeholder_token="<alice>, <bob>", **base).train.placeholder_tokens == TOKENS
    one = cog_support.config_for_training(placeholder_token="<sks>", **base).train
    assert one.placeholder_tokens == ["<sks>"] and one.placeholder_token == "<sks>"
    with pytest.raises(ConfigError, match="placeholder token '<bob>' is listed twice"):
        cog_support.config_for_training(placeholder_token="<bob>,<alice>,<bob>", **base)


def test_install_placeholder_one_token_is_install_placeholders_of_one(tiny_pipe):
    a = copy.deepcopy(tiny_pipe)
    r1 = install_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zwx>", init_std=1e-3,
                             generator=torch.Generator().manual_seed(0))
    (r2,) = install_placeholders(a.tokenizer, a.text_encoder, ["<zwx>"], init_std=1e-3,
                                 generator=torch.Generator().manual_seed(0))
    assert (r1.token, r1.token_id) == (r2.token, r2.token_id) == ("<zwx>", 151665)
    assert torch.equal(r1.vector, r2.vector)
