"""Training -> weights.zip -> inference, on tiny random Qwen-Image models of the real classes (CPU)."""

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_zero_prior.training.archive import load_archive
from qwen_zero_prior.training.data import scan_dataset
from qwen_zero_prior.training.inference import GenerateOptions, InferenceSession
from qwen_zero_prior.training.models import load_pipeline
from qwen_zero_prior.training.run import train
from qwen_zero_prior.training.trainer import Callbacks, Trainer, TrainingInterrupted


def test_tiny_overfit_loss_falls_and_token_moves(tiny_pipe, dataset_dir, make_config, tmp_path):
    cfg = make_config(steps=200, placeholder_init_std=1e-5, learning_rate=3e-3, token_learning_rate=5e-2)
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    trainer = Trainer(cfg, tiny_pipe, examples, tmp_path)
    init = trainer.token.vector.detach().clone()

    def fixed_loss():
        with torch.no_grad():
            return sum(float(trainer.loss_for([i], torch.Generator().manual_seed(100 + i))) for i in range(4)) / 4

    before = fixed_loss()
    result = trainer.fit(tmp_path / "weights.zip")
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)
    moved = (trainer.token.vector.detach() - init).norm().item()
    assert moved > 100 * init.norm().item(), "the token row stayed at its init"
    assert result.loss_plot is not None and result.loss_plot.is_file()
    assert Image.open(result.loss_plot).size[0] > 100


def test_train_predict_metadata_and_image(tiny_model_dir, dataset_dir, make_config, tmp_path):
    cfg = make_config(tiny_model_dir, steps=8, checkpoint_every=4)
    result = train(cfg, dataset_dir, tmp_path / "out" / "weights.zip")
    meta = json.loads(zipfile.ZipFile(result.archive).read("meta.json"))
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["placeholder_token"] == "<zwx>" and meta["placeholder_token_id"] == 151665
    assert meta["rank"] == 4 and meta["steps"] == 8 and meta["embedding_dim"] == 32
    assert meta["alpha"] == 4.0 and meta["placeholder_init_std"] == 1e-5 and "add_q_proj" in meta["lora_targets"]
    assert (tmp_path / "out" / "checkpoints" / "step-000008").is_dir()

    arc = load_archive(result.archive)
    session = InferenceSession(load_pipeline(cfg.model))
    opts = GenerateOptions("a photo of <zwx>", steps=2, guidance=1.0, width=32, height=32, seed=3)
    plain = np.asarray(session.generate(opts), dtype=np.int16)
    session.apply(arc, lora_scale=1.0)
    assert session.token_id == 151665
    assert session.lora_report == {"missing": [], "unexpected": []}
    with_weights = np.asarray(session.generate(opts), dtype=np.int16)
    assert with_weights.shape == (32, 32, 3)
    assert np.abs(with_weights - plain).max() > 0
    session.clear()  # back to the base model: same pixels as before
    assert np.array_equal(np.asarray(session.generate(opts), dtype=np.int16), plain)
    assert "<zwx>" not in session.pipe.tokenizer.get_added_vocab()


def test_cli_predict_uses_archive_meta(tiny_model_dir, dataset_dir, make_config, tmp_path):
    from qwen_zero_prior.cli import main

    cfg = make_config(tiny_model_dir, steps=2)
    result = train(cfg, dataset_dir, tmp_path / "weights.zip")
    out = tmp_path / "img.png"
    rc = main(["predict", "--archive", str(result.archive), "--prompt", "a photo of <zwx>", "--steps", "2",
               "--width", "32", "--height", "32", "--guidance", "1", "--dtype", "float32", "--device", "cpu",
               "--output", str(out)])
    assert rc == 0 and Image.open(out).size == (32, 32)
    assert main(["predict", "--archive", str(tmp_path / "missing.zip"), "--prompt", "x"]) == 2


def test_feature_off_is_plain_lora(tiny_model_dir, dataset_dir, make_config, tmp_path):
    from transformers import AutoTokenizer

    cfg = make_config(tiny_model_dir, steps=2, train_placeholder_token=False)
    result = train(cfg, dataset_dir, tmp_path / "weights.zip")
    arc = load_archive(result.archive)
    assert arc.has_lora and not arc.has_token
    assert arc.meta.placeholder_token is None and arc.meta.placeholder_token_id is None
    assert set(zipfile.ZipFile(result.archive).namelist()) == {"meta.json", "lora/lora_weights.safetensors"}
    assert result.token_id is None
    # the saved model's tokenizer was not touched
    assert "<zwx>" not in AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer")).get_added_vocab()


def test_cli_train_with_yaml(tiny_model_dir, dataset_dir, tmp_path, capsys):
    from qwen_zero_prior.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"model:\n  base_model: {tiny_model_dir}\n  dtype: float32\n  device: cpu\n"
        "train:\n  train_placeholder_token: true\n  placeholder_token: '<zwx>'\n  placeholder_init_std: 0\n"
        "  rank: 2\n  steps: 2\n  resolution: 32\n  checkpoint_every: 0\n"
        "sample:\n  prompts: ['a photo of <zwx>']\n  every: 2\n  steps: 2\n  guidance: 1\n"
        "debug:\n  log_prompt_ids: true\n"
    )
    rc = main(["train", "--config", str(cfg), "--set", "train.rank=3", "--dataset", str(dataset_dir),
               "--output", str(tmp_path / "run" / "weights.zip")])
    assert rc == 0
    arc = load_archive(tmp_path / "run" / "weights.zip")
    assert arc.meta.rank == 3 and arc.meta.placeholder_init_std == 0.0
    assert (tmp_path / "run" / "samples" / "step-000002-0.png").is_file()
    assert (tmp_path / "run" / "weights_loss.png").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    assert main(["train", "--config", str(bad), "--dataset", str(dataset_dir)]) == 2
    assert "unknown key train.stepz" in capsys.readouterr().err


def test_resume_matches_uninterrupted(tiny_model_dir, dataset_dir, make_config, tmp_path):
    cfg = make_config(tiny_model_dir, steps=6, checkpoint_every=3)
    full = train(cfg, dataset_dir, tmp_path / "a" / "weights.zip")

    calls = {"n": 0}

    def stop_after_3():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, dataset_dir, tmp_path / "b" / "weights.zip", callbacks=Callbacks(should_stop=stop_after_3))
    assert e.value.step == 3 and e.value.checkpoint.name == "step-000003"
    assert not (tmp_path / "b" / "weights.zip").exists()
    resumed = train(cfg, dataset_dir, tmp_path / "b" / "weights.zip", resume=tmp_path / "b")
    assert resumed.steps == 6
    a, b = load_archive(full.archive), load_archive(resumed.archive)
    assert torch.allclose(a.vector, b.vector, atol=1e-6)
    for k in a.lora_state_dict:
        assert torch.allclose(a.lora_state_dict[k], b.lora_state_dict[k], atol=1e-6), k
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)

    other = make_config(tiny_model_dir, steps=6, rank=2)
    with pytest.raises(ValueError, match="train.rank=4"):
        train(other, dataset_dir, tmp_path / "c" / "weights.zip", resume=tmp_path / "b")


def test_fp8_storage_trains_lora_and_token(tiny_model_dir, dataset_dir, make_config, tmp_path):
    cfg = make_config(tiny_model_dir, steps=2).replace(model={"quantize": True})
    pipe = load_pipeline(cfg.model)
    linear = pipe.transformer.transformer_blocks[0].attn.to_q
    assert linear.weight.dtype == torch.float8_e4m3fn
    result = train(cfg, dataset_dir, tmp_path / "weights.zip", pipe=pipe)
    arc = load_archive(result.archive)
    assert arc.has_lora and arc.has_token and all(torch.isfinite(v).all() for v in arc.lora_state_dict.values())
    # fp8 text encoder for plain LoRA training / inference only
    te_cfg = make_config(tiny_model_dir, steps=1, train_placeholder_token=False).replace(model={"quantize_te": True})
    te_pipe = load_pipeline(te_cfg.model)
    assert te_pipe.text_encoder.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    train(te_cfg, dataset_dir, tmp_path / "plain.zip", pipe=te_pipe)
