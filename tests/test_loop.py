"""The one training loop (``training/trainer.py``) over a backend: what every front end shares."""

import logging

import pytest
import torch

from qwen_zero_prior.training.backend import TrainBackend
from qwen_zero_prior.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from qwen_zero_prior.training.data import scan_dataset
from qwen_zero_prior.training.diffusers_backend import DiffusersBackend
from qwen_zero_prior.training.trainer import Callbacks, Trainer, TrainingInterrupted


class StopNow(Exception):
    """Stands in for ComfyUI's InterruptProcessingException, which ComfyUI >= 0.33 raises inside model forwards."""


def _examples(dataset_dir):
    return scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)


def test_pipeline_is_wrapped_in_the_diffusers_backend(tiny_pipe, dataset_dir, make_config, tmp_path):
    trainer = Trainer(make_config(), tiny_pipe, _examples(dataset_dir), tmp_path)
    assert isinstance(trainer.backend, DiffusersBackend) and isinstance(trainer.backend, TrainBackend)
    names = trainer.param_names
    assert names[-1] == "placeholder_vector" and all(".lora_A." in n or ".lora_B." in n for n in names[:-1])
    assert not any(".zero_prior." in n for n in names)  # peft's adapter name is not part of the checkpoint keys
    # the token's group has weight decay 0, the LoRA's the configured decay
    groups = trainer.optimizer.param_groups
    assert groups[1]["params"] == [trainer.token.vector] and groups[1]["weight_decay"] == 0.0
    assert groups[0]["weight_decay"] == trainer.t.weight_decay > 0


def test_interrupt_raised_inside_a_step_checkpoints_completed_steps(tiny_pipe, dataset_dir, make_config, tmp_path):
    trainer = Trainer(make_config(steps=10), tiny_pipe, _examples(dataset_dir), tmp_path)
    plain = trainer.backend.predict
    calls = []

    def predict(*args):
        calls.append(1)
        if len(calls) == 4:  # during the forward of the 4th step
            raise StopNow()
        return plain(*args)

    trainer.backend.predict = predict
    with pytest.raises(TrainingInterrupted) as e:
        trainer.fit(tmp_path / "weights.zip", Callbacks(interrupt_exceptions=(StopNow,)))
    assert e.value.step == 3 and e.value.checkpoint is not None
    state = load_checkpoint(e.value.checkpoint)
    assert state["step"] == 3 and state["trainer"] == "diffusers" and len(state["losses"]) == 3
    assert not (tmp_path / "weights.zip").exists()
    # an exception that is not an interrupt propagates as is, with no checkpoint written for it
    trainer.backend.predict = lambda *a: (_ for _ in ()).throw(ValueError("boom"))
    before = list_checkpoints(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="boom"):
        trainer.fit(tmp_path / "weights.zip", Callbacks(interrupt_exceptions=(StopNow,)))
    assert list_checkpoints(tmp_path / "checkpoints") == before


def test_checkpoint_resumes_only_on_the_backend_that_wrote_it(tiny_pipe, dataset_dir, make_config, tmp_path):
    import copy

    trainer = Trainer(make_config(steps=2, checkpoint_every=1), copy.deepcopy(tiny_pipe), _examples(dataset_dir),
                      tmp_path)
    trainer.fit(tmp_path / "weights.zip")

    class Other(DiffusersBackend):
        name = "comfyui"

    other = Trainer(make_config(steps=4), Other(make_config(), copy.deepcopy(tiny_pipe)), _examples(dataset_dir),
                    tmp_path / "other")
    with pytest.raises(CheckpointError, match="written by the diffusers trainer; it resumes only there"):
        other.resume(tmp_path)
    fresh = Trainer(make_config(steps=4), copy.deepcopy(tiny_pipe), _examples(dataset_dir), tmp_path / "again")
    fresh.resume(tmp_path)
    assert fresh.step == 2
    assert torch.equal(fresh.token.vector.detach(), trainer.token.vector.detach())
    own = dict(trainer.backend.named_lora_parameters())
    for name, p in fresh.backend.named_lora_parameters():
        assert torch.equal(p.detach(), own[name].detach()), name


def test_resume_restores_moments_saved_under_the_older_names(tiny_pipe, dataset_dir, make_config, tmp_path):
    """Checkpoints written before the one loop named the LoRA's AdamW moments with peft's adapter name inside
    (``…lora_A.zero_prior.weight``): resuming one restores them instead of silently restarting the moments."""
    import copy
    import json

    from safetensors.torch import load_file, save_file

    trainer = Trainer(make_config(steps=2, checkpoint_every=1), copy.deepcopy(tiny_pipe), _examples(dataset_dir),
                      tmp_path)
    trainer.fit(tmp_path / "weights.zip")
    where = list_checkpoints(tmp_path / "checkpoints")[-1]
    legacy = lambda n: n.replace(".lora_A.", ".lora_A.zero_prior.").replace(".lora_B.", ".lora_B.zero_prior.")  # noqa: E731
    opt = load_file(where / "optimizer.safetensors")
    save_file({legacy(k): v for k, v in opt.items()}, where / "optimizer.safetensors")
    state = json.loads((where / "state.json").read_text())
    state["optimizer"]["steps"] = {legacy(k): v for k, v in state["optimizer"]["steps"].items()}
    (where / "state.json").write_text(json.dumps(state))

    fresh = Trainer(make_config(steps=4), copy.deepcopy(tiny_pipe), _examples(dataset_dir), tmp_path / "again")
    fresh.resume(tmp_path)
    restored = [p for p in fresh.lora_params if p in fresh.optimizer.state]
    assert len(restored) > 0.9 * len(fresh.lora_params)
    own = dict(zip(trainer.param_names, trainer.trainable()))
    for name, p in zip(fresh.param_names, fresh.trainable()):
        if p in fresh.optimizer.state:
            assert torch.equal(fresh.optimizer.state[p]["exp_avg"], trainer.optimizer.state[own[name]]["exp_avg"])


def test_the_heap_is_frozen_after_the_first_step_and_released_when_training_ends(tiny_pipe, dataset_dir, make_config,
                                                                                 tmp_path, monkeypatch, caplog):
    """Python's full collections skip the model's objects from step 2 on (training/heap.py: a freeze after each of
    the first steps), and the collector is handed back when fit ends, normally or by an error; also where someone
    else froze objects before."""
    import gc

    from qwen_zero_prior.training.heap import FrozenHeap

    before = gc.get_freeze_count()  # 0 here; a Python that starts with objects frozen (the GPU machine's) has some
    trainer = Trainer(make_config(steps=4), tiny_pipe, _examples(dataset_dir), tmp_path)
    plain, calls = trainer.backend.predict, []

    def predict(*args):
        calls.append(gc.get_freeze_count())
        if len(calls) == 3:
            raise ValueError("boom")
        return plain(*args)

    trainer.backend.predict = predict
    with pytest.raises(ValueError, match="boom"):
        trainer.fit(tmp_path / "weights.zip")
    assert calls[0] == before and calls[1] > before + 1000  # frozen after the first step
    assert gc.get_freeze_count() == 0  # released on the error too (with what others froze before: heap.py)
    seen, freezes = [], []
    trainer.backend.predict = plain
    plain_freeze = FrozenHeap.freeze
    monkeypatch.setattr(FrozenHeap, "freeze", lambda self: freezes.append(plain_freeze(self)) or freezes[-1])
    on_step = Callbacks(on_step=lambda step, total, loss: seen.append(gc.get_freeze_count()))
    trainer.fit(tmp_path / "weights.zip", on_step)
    assert len(seen) == 2 and all(n > 1000 for n in seen)  # frozen from the first step's end: the model's objects
    # and again after the next step (what it created too). Not compared by count: frozen objects still die by
    # reference counting, and the tiny model's second step may leave fewer new ones than that (861077 -> 861075 seen)
    assert freezes == [True, True]
    assert gc.get_freeze_count() == 0

    gc.freeze()  # someone else froze a few objects first (the GPU machine's Python had 375): the model still freezes
    try:
        theirs = gc.get_freeze_count()
        model = [[object()] for _ in range(5000)]  # tracked objects created after their freeze
        heap = FrozenHeap()
        assert heap.freeze() is True and gc.get_freeze_count() >= theirs + 5000
        assert not any(o is model for o in gc.get_objects())  # out of the collector's walks
        with caplog.at_level(logging.INFO, logger="qwen_zero_prior.training.heap"):
            heap.release()
        assert gc.get_freeze_count() == 0 and f"{theirs} objects that were frozen before training" in caplog.text
    finally:
        gc.unfreeze()
