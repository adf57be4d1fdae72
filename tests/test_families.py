"""Model families: detection from folders, pipelines and config values; the archive's model_family; one clear
error when an archive of one family meets a base model of the other."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_zero_prior.training import families as F
from qwen_zero_prior.training.archive import ArchiveError, ArchiveMeta, load_archive, write_archive
from qwen_zero_prior.training.config import FAMILY_CHOICES, Config, ConfigError


def _index(folder, class_name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return folder


def _meta(**kw):
    base = dict(base_model="tiny", placeholder_token="<zwx>", placeholder_token_id=151669, rank=4,
                created=ArchiveMeta.now())
    base.update(kw)
    return ArchiveMeta(**base)


def test_config_choices_are_the_families():
    assert FAMILY_CHOICES == F.FAMILY_CHOICES == ("auto", *F.FAMILIES)
    assert Config().model.family == "auto"
    with pytest.raises(ConfigError, match=r"model.family must be one of \['auto', 'qwen-image', 'qwen-image-2.1'\], "
                                          r"got 'qwen-image-3'"):
        Config.from_dict({"model": {"family": "qwen-image-3"}})


def test_family_facts():
    qi, q21 = F.get_family("qwen-image"), F.get_family("qwen-image-2.1")
    assert (qi.pipeline_class, qi.embedding_dim, qi.embedding_rows) == ("QwenImagePipeline", 3584, 152064)
    assert (q21.pipeline_class, q21.embedding_dim, q21.embedding_rows) == ("QwenImage21Pipeline", 4096, 151936)
    assert q21.transformer_class == "QwenImage21Transformer2DModel" and q21.vae_class == "AutoencoderKLQwenImage21"
    assert q21.text_encoder_class == "Qwen3VLForConditionalGeneration"
    assert q21.bucket_step == 32 and qi.bucket_step == 16
    import diffusers

    assert q21.pipeline_cls() is diffusers.QwenImage21Pipeline and qi.pipeline_cls() is diffusers.QwenImagePipeline
    with pytest.raises(F.FamilyError, match=r"unknown model family 'flux'; known: qwen-image, qwen-image-2.1"):
        F.get_family("flux")


def test_detect_folder(tmp_path):
    assert F.detect_folder(_index(tmp_path / "a", "QwenImage21Pipeline")).name == "qwen-image-2.1"
    assert F.detect_folder(_index(tmp_path / "b", "QwenImagePipeline")).name == "qwen-image"
    with pytest.raises(F.FamilyError, match=r"_class_name 'FluxPipeline' is not a supported pipeline; expected one "
                                            r"of QwenImagePipeline, QwenImage21Pipeline"):
        F.detect_folder(_index(tmp_path / "c", "FluxPipeline"))
    with pytest.raises(F.FamilyError, match="no model_index.json; not a diffusers pipeline folder"):
        F.detect_folder(tmp_path / "empty")
    bad = tmp_path / "d"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(F.FamilyError, match="cannot read it as JSON"):
        F.detect_folder(bad)


def test_resolve_family_config_value_and_folder(tmp_path):
    q21 = _index(tmp_path / "q21", "QwenImage21Pipeline")
    assert F.resolve_family("auto", q21).name == "qwen-image-2.1"
    assert F.resolve_family("qwen-image-2.1", q21).name == "qwen-image-2.1"
    assert F.resolve_family("qwen-image", "Qwen/Qwen-Image").name == "qwen-image"  # named: no hub look-up
    with pytest.raises(F.FamilyError) as e:
        F.resolve_family("qwen-image", q21)
    assert str(e.value) == (f"model.family is 'qwen-image' (Qwen-Image) but {q21} holds a Qwen-Image 2.1 pipeline "
                            "(QwenImage21Pipeline); set model.family to 'qwen-image-2.1' or auto")
    with pytest.raises(F.FamilyError, match="model.family must be one of"):
        F.resolve_family("sdxl", q21)


def test_detect_pipeline(tiny_pipe, tiny_pipe_21):
    assert F.detect_pipeline(tiny_pipe).name == "qwen-image"
    assert F.detect_pipeline(tiny_pipe_21).name == "qwen-image-2.1"

    class Derived(type(tiny_pipe_21)):  # e.g. diffusers' own validation subclass in its 2.1 training script
        pass

    assert F.detect_pipeline(Derived.__new__(Derived)).name == "qwen-image-2.1"
    with pytest.raises(F.FamilyError, match="object is not a pipeline of a supported model family"):
        F.detect_pipeline(object())


def test_tokenizer_access(tiny_pipe, tiny_pipe_21):
    q21 = F.detect_pipeline(tiny_pipe_21)
    assert q21.tokenizer(tiny_pipe_21) is tiny_pipe_21.processor.tokenizer
    assert F.detect_pipeline(tiny_pipe).tokenizer(tiny_pipe) is tiny_pipe.tokenizer
    other = object()
    q21.set_tokenizer(tiny_pipe_21, other)
    assert tiny_pipe_21.processor.tokenizer is other


def test_lora_targets_translate_qwen_image_presets():
    from qwen_zero_prior.training.config import ATTENTION_TARGETS, MLP_TARGETS, TrainConfig

    q21 = F.get_family("qwen-image-2.1")
    full = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]
    assert q21.default_lora_targets == full
    assert q21.lora_targets(TrainConfig().lora_targets) == full  # the config default means the family default
    assert q21.lora_targets(list(ATTENTION_TARGETS + MLP_TARGETS)) == full
    assert q21.lora_targets("attention") == full[:4]
    assert q21.lora_targets("attention+mlp+txt_in")[-2:] == ["txt_in.in_layer", "txt_in.out_layer"]
    # a 2.1-only preset named in a config arrives as a one-name list (TrainConfig knows Qwen-Image's presets only)
    assert TrainConfig(lora_targets="attention+mlp+txt_in").lora_targets == ["attention+mlp+txt_in"]
    assert q21.lora_targets(["attention+mlp+txt_in"]) == full + ["txt_in.in_layer", "txt_in.out_layer"]
    assert q21.lora_targets(["attn.to_q", "txt_in.in_layer"]) == ["attn.to_q", "txt_in.in_layer"]
    qi = F.get_family("qwen-image")
    assert qi.lora_targets(TrainConfig().lora_targets) == list(ATTENTION_TARGETS)


# ---- archives ---------------------------------------------------------------------------------------------


def test_meta_records_family_and_old_archives_are_qwen_image(tmp_path):
    p = write_archive(tmp_path / "w.zip", _meta(model_family="qwen-image-2.1"), None, torch.ones(8))
    arc = load_archive(p)
    assert arc.meta.model_family == "qwen-image-2.1" and F.archive_family(arc.meta).name == "qwen-image-2.1"
    raw = {"format_version": 1, "base_model": "x", "placeholder_token": None, "placeholder_token_id": None,
           "rank": 4, "created": "2025-01-01T00:00:00Z", "contents": ["token"]}
    old = ArchiveMeta.from_json(json.dumps({**raw, "placeholder_token": "<zwx>"}), "old.zip")
    assert old.model_family == "qwen-image" and "model_family" not in old.extra
    with pytest.raises(ArchiveError, match=r"new.zip: meta.json model_family must be one of \['qwen-image', "
                                           r"'qwen-image-2.1'\], got 'qwen-image-9'"):
        ArchiveMeta.from_json(json.dumps({**raw, "placeholder_token": "<zwx>", "model_family": "qwen-image-9"}),
                              "new.zip")


def _archive(tmp_path, family, dim=32):
    kw = {} if family is None else {"model_family": family}  # None: an archive from before 2.1 support
    return load_archive(write_archive(tmp_path / f"{family}.zip", _meta(**kw), None, torch.full((dim,), 0.5)))


def test_inference_refuses_other_family(tiny_pipe, tiny_pipe_21, tmp_path):
    from qwen_zero_prior.training.inference import InferenceSession

    # the tiny models share a text width (32), so only the family check stands between them
    s21 = InferenceSession(tiny_pipe_21)
    for family in ("qwen-image", None):
        arc = _archive(tmp_path, family)
        with pytest.raises(F.FamilyMismatchError) as e:
            s21.apply(arc)
        assert str(e.value) == (
            f"{arc.source}: this archive was trained on Qwen-Image (meta.json model_family 'qwen-image') but the "
            "base model is Qwen-Image 2.1 ('qwen-image-2.1'); its token vector and LoRA only fit Qwen-Image. "
            "Load it with a Qwen-Image base model, or train one for Qwen-Image 2.1."
        )
        assert isinstance(e.value, ArchiveError) and s21.archive is None
    sqi = InferenceSession(tiny_pipe)
    with pytest.raises(F.FamilyMismatchError, match=r"trained on Qwen-Image 2.1 \(meta.json model_family "
                                                    r"'qwen-image-2.1'\) but the base model is Qwen-Image \('qwen-image'\)"):
        sqi.apply(_archive(tmp_path, "qwen-image-2.1"))
    sqi.apply(_archive(tmp_path, None))  # an old archive still fits Qwen-Image
    assert sqi.token_id == 151665


def test_load_pipeline_refuses_family_that_contradicts_the_folder(tmp_path):
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.models import ModelLoadError, load_pipeline

    folder = _index(tmp_path / "q21", "QwenImage21Pipeline")
    with pytest.raises(ModelLoadError, match=r"model.family is 'qwen-image' \(Qwen-Image\) but .* holds a "
                                             r"Qwen-Image 2.1 pipeline \(QwenImage21Pipeline\)"):
        load_pipeline(ModelConfig(base_model=str(folder), family="qwen-image", dtype="float32", device="cpu"))
    other = _index(tmp_path / "flux", "FluxPipeline")
    with pytest.raises(ModelLoadError, match="_class_name 'FluxPipeline' is not a supported pipeline"):
        load_pipeline(ModelConfig(base_model=str(other), dtype="float32", device="cpu"))


def test_load_pipeline_auto_loads_the_folders_family(tiny_model_dir):
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.models import load_pipeline

    pipe = load_pipeline(ModelConfig(base_model=str(tiny_model_dir), dtype="float32", device="cpu"))
    assert type(pipe).__name__ == "QwenImagePipeline"


def test_load_pipeline_21_from_folder(tiny_pipe_21, tmp_path):
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("transformers loads a Qwen3VLProcessor (QwenImage21Pipeline's) only with torchvision installed")
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.models import load_pipeline

    tiny_pipe_21.save_pretrained(tmp_path / "q21")
    pipe = load_pipeline(ModelConfig(base_model=str(tmp_path / "q21"), dtype="float32", device="cpu"))
    assert type(pipe).__name__ == "QwenImage21Pipeline" and F.detect_pipeline(pipe).name == "qwen-image-2.1"


def test_buckets_follow_the_family_step():
    from qwen_zero_prior.training.data import Example, assign_buckets

    def bucket(step):
        return assign_buckets([Example(image=None, caption="c", size=(300, 200))], 256, step)[0].bucket

    assert bucket(F.get_family("qwen-image").bucket_step) == (320, 208)  # fine for Qwen-Image, odd for 2.1
    assert bucket(F.get_family("qwen-image-2.1").bucket_step) == (320, 192)
