"""The text encoder's vision tower and LM head left in CPU memory for training (training/text_parts.py)."""

from __future__ import annotations

import copy
from unittest import mock

import numpy as np
import pytest
import torch

from qwen_zero_prior.training import memory, text_parts
from qwen_zero_prior.training.config import Config
from qwen_zero_prior.training.data import scan_dataset
from qwen_zero_prior.training.trainer import Trainer


def _one_step_config(dtype: str, device: str) -> Config:
    """One training step with the token and a sample prompt, on ``device``."""
    return Config.from_dict({"model": {"base_model": "x", "dtype": dtype, "device": device},
                             "train": {"train_placeholder_token": True, "rank": 4, "resolution": 32, "steps": 1,
                                       "checkpoint_every": 0, "seed": 0},
                             "sample": {"prompts": ["a photo of <zwx>"], "steps": 2, "every": 1}})


def _sample(pipe):
    return np.asarray(pipe(prompt="a photo of a dog", num_inference_steps=2, width=32, height=32,
                           generator=torch.Generator().manual_seed(0), output_type="np").images[0])


def _hidden(te, ids):
    return te(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]


def test_park_keeps_text_conditioning_and_the_pipeline_call(tiny_pipe):
    """After ``park`` the pipeline still renders (its text encoder's forward applies ``lm_head``) the same pixels
    and hidden states; the head is ``NoLogits`` (no logits, not in the state dict, not moved by ``.to``); what it
    counts as unused is the vision tower and the head; ``unpark`` puts the head back."""
    te = tiny_pipe.text_encoder
    ids = torch.tensor([tiny_pipe.tokenizer("a photo of a dog")["input_ids"]])
    before_px, before_h = _sample(tiny_pipe), _hidden(te, ids)
    head, visual = te.lm_head, te.model.visual
    params = memory.module_bytes(te)
    assert text_parts.unused_bytes(te, parameters_only=True) == memory.module_bytes(visual, head)
    assert text_parts.placed_bytes(te) == params - memory.module_bytes(visual, head)

    assert text_parts.park(te) == 0  # nothing was on another device than the CPU
    assert isinstance(te.lm_head, text_parts.NoLogits) and te.lm_head.replaced == [head]
    assert te.model.visual is visual
    assert not any(k.startswith("lm_head") for k in te.state_dict())
    out = te(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (*ids.shape, 0)
    assert torch.equal(_hidden(te, ids), before_h)
    assert np.array_equal(_sample(tiny_pipe), before_px)
    # still counted the same once parked (the replaced head is no longer te's parameter)
    assert text_parts.unused_bytes(te, parameters_only=True) == memory.module_bytes(visual, head)
    assert text_parts.placed_bytes(te) == params - memory.module_bytes(visual, head)
    te.to(torch.float64)
    assert head.weight.dtype == torch.float32  # not registered: the model's .to() leaves it alone
    te.to(torch.float32)
    assert text_parts.park(te) == 0 and te.lm_head.replaced == [head]  # idempotent
    text_parts.unpark(te)
    assert te.lm_head is head
    text_parts.unpark(te)  # nothing parked: nothing to do
    assert te.lm_head is head


def test_park_moves_an_untied_head_and_the_vision_tower_but_never_a_tied_head():
    """``park`` moves the vision tower and an untied head to the CPU; a head tied to the input embeddings is
    replaced but not moved (its weight is the embedding table's, which conditioning needs), nor counted."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
                           vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                                          "out_hidden_size": 16, "fullatt_block_indexes": [0]})
    for tied in (False, True):
        te = Qwen2_5_VLForConditionalGeneration(cfg)
        head, embed = te.lm_head, te.get_input_embeddings()
        if tied:
            head.weight = embed.weight
        moved = []
        real_to = torch.nn.Module.to

        def spy(self, *a, **k):
            moved.append(self)
            return real_to(self, *a, **k)

        with mock.patch.object(torch.nn.Module, "to", spy):
            text_parts.park(te)
        assert moved == ([te.model.visual] if tied else [te.model.visual, head])
        assert isinstance(te.lm_head, text_parts.NoLogits) and te.get_input_embeddings().weight is embed.weight
        assert text_parts.unused_bytes(te, parameters_only=True) == memory.module_bytes(te.model.visual) + (
            0 if tied else memory.module_bytes(head))


def test_training_parks_them_and_samples_still_render(tiny_pipe, dataset_dir, tmp_path):
    """The trainer's backend parks them in ``prepare`` (the CLI, Cog and the bench all train through it), and a
    sample rendered mid-training through the pipeline call works with the head replaced."""
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    cfg = _one_step_config("float32", "cpu")
    trainer = Trainer(cfg, tiny_pipe, examples, tmp_path)
    assert isinstance(tiny_pipe.text_encoder.lm_head, text_parts.NoLogits)
    trainer.train_step()
    paths, images = trainer.render_samples()
    assert len(paths) == 1 and paths[0].is_file() and images[0].size == (32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="placement on a GPU (run on the device machine)")
def test_training_on_a_gpu_leaves_them_in_cpu_memory(tiny_pipe, dataset_dir, tmp_path):
    """On a GPU nothing of the vision tower or the LM head stays in GPU memory once training is set up, the rest of
    the text encoder is there, and a sample renders."""
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    cfg = _one_step_config("bfloat16", "cuda")
    te = tiny_pipe.text_encoder
    trainer = Trainer(cfg, tiny_pipe.to("cuda", torch.bfloat16), examples, tmp_path)
    unused = text_parts.unused_tensors(te)
    assert unused and all(t.device.type == "cpu" for t in unused)
    assert te.get_input_embeddings().weight.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in te.model.language_model.parameters())
    trainer.train_step()
    paths, _ = trainer.render_samples()
    assert len(paths) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="placement on a GPU (run on the device machine)")
def test_training_placement_on_a_gpu_never_moves_them(tiny_pipe, dataset_dir, tmp_path):
    """The CLI's placement (``place_pipeline(for_training=True)``) on a real GPU: the vision tower and the LM head never
    reach GPU memory (it allocates less than inference's placement of the same pipeline, which moves them), and a step
    and a sample run after it."""
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.models import place_pipeline

    te = tiny_pipe.text_encoder
    visual, head = te.model.visual, te.lm_head
    inference_pipe = copy.deepcopy(tiny_pipe)
    cuda = torch.device("cuda")
    start = torch.cuda.memory_allocated()
    place_pipeline(tiny_pipe, ModelConfig(dtype="bfloat16"), cuda, for_training=True)
    for_training = torch.cuda.memory_allocated() - start
    assert {t.device.type for t in (*visual.parameters(), *head.parameters())} == {"cpu"}
    assert all(p.device.type == "cuda" for p in te.model.language_model.parameters())
    start = torch.cuda.memory_allocated()
    place_pipeline(inference_pipe, ModelConfig(dtype="bfloat16"), cuda, for_training=False)  # moves them too
    assert torch.cuda.memory_allocated() - start > for_training
    del inference_pipe
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    cfg = _one_step_config("bfloat16", "cuda")
    trainer = Trainer(cfg, tiny_pipe, examples, tmp_path)
    trainer.train_step()
    assert len(trainer.render_samples()[0]) == 1


@pytest.mark.parametrize("for_training", [False, True])
def test_placing_for_training_leaves_them_in_cpu_memory(tiny_pipe, for_training):
    """``place_pipeline(for_training=True)`` (how training places the pipeline) moves everything but the vision
    tower and the LM head, which would cross to the GPU only to be parked again; inference's placement moves them
    too. The meta device stands in for the GPU: where each tensor goes shows, nothing is computed."""
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.models import place_pipeline

    te = tiny_pipe.text_encoder
    visual, head = te.model.visual, te.lm_head
    place_pipeline(tiny_pipe, ModelConfig(dtype="float32"), torch.device("meta"), for_training=for_training)
    assert te.model.visual is visual and dict(te.model.named_children())["visual"] is visual  # registered again
    assert all(p.device.type == "meta" for p in te.model.language_model.parameters())
    assert te.get_input_embeddings().weight.device.type == "meta"
    assert tiny_pipe.transformer.device.type == "meta" and tiny_pipe.vae.device.type == "meta"
    assert {t.device.type for t in (*visual.parameters(), *head.parameters())} == {"cpu" if for_training else "meta"}
    assert isinstance(te.lm_head, text_parts.NoLogits) == for_training


def test_left_behind_registers_the_tower_again_when_the_move_fails(tiny_pipe):
    te = tiny_pipe.text_encoder
    visual = te.model.visual
    with pytest.raises(RuntimeError, match="move failed"), text_parts.left_behind(te):
        assert "visual" not in dict(te.model.named_children())
        raise RuntimeError("move failed")
    assert te.model.visual is visual and dict(te.model.named_children())["visual"] is visual
