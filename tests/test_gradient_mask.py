"""Only the placeholder row trains: every other text-encoder weight is bit-identical after AdamW steps."""

import logging

import torch

from qwen_zero_prior.training import text_parts
from qwen_zero_prior.training.data import scan_dataset
from qwen_zero_prior.training.token import materialize


def test_only_token_row_changes(tiny_pipe, dataset_dir, make_config, tmp_path, caplog):
    from qwen_zero_prior.training.trainer import Trainer

    cfg = make_config(steps=3, weight_decay=0.1, placeholder_init_std=0.0)
    cfg = cfg.replace(debug={"log_prompt_ids": True})
    te = tiny_pipe.text_encoder
    before = {k: v.detach().clone() for k, v in te.state_dict().items()}
    tr_before = {k: v.detach().clone() for k, v in tiny_pipe.transformer.state_dict().items()}
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    with caplog.at_level(logging.INFO, logger="qwen_zero_prior"):
        trainer = Trainer(cfg, tiny_pipe, examples, tmp_path)
        for _ in range(3):
            trainer.train_step()
    token_id = trainer.token.token_id
    assert token_id == 151665
    # the log names the id, the prompt ids and the mask
    assert "registered as id 151665" in caplog.text
    assert "gradient mask active" in caplog.text
    assert "[64, 6548, 315, 220, 151665" in caplog.text

    groups = trainer.optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["params"][0] is trainer.token.vector
    vec = trainer.token.vector.detach().clone()
    assert vec.abs().sum() > 0, "the token row did not move off its zero init"

    materialize(te)
    text_parts.unpark(te)  # training replaced the unused LM head (text_parts.park): compare it too
    after = te.state_dict()
    assert set(after) == set(before)
    key = next(k for k in after if k.endswith("embed_tokens.weight"))
    for k, v in after.items():
        if k == key:
            changed = (v != before[k]).any(dim=1).nonzero().flatten().tolist()
            assert changed == [token_id]
            assert torch.equal(v[token_id], vec)
        else:
            assert torch.equal(v, before[k]), f"text-encoder weight {k} changed"
    # base transformer weights are untouched as well (only LoRA matrices train)
    for k, v in tiny_pipe.transformer.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, tr_before[k.replace(".base_layer", "")]), k


def test_prefetched_step_inputs_train_the_same_as_fresh_ones(tiny_pipe, dataset_dir, make_config, tmp_path):
    """``Trainer.prefetch`` (on for CUDA) prepares step n+1's latents, noise and timesteps at the end of step n;
    the losses and the trained token must be what a trainer without it computes, also across a resume."""
    import copy

    from qwen_zero_prior.training.trainer import Trainer

    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    runs = {}
    for prefetch in (False, True):
        trainer = Trainer(make_config(steps=4, batch_size=1), copy.deepcopy(tiny_pipe), examples, tmp_path / str(prefetch))
        trainer.prefetch = prefetch
        losses = [trainer.train_step() for _ in range(3)]
        runs[prefetch] = (losses, trainer.token.vector.detach().clone())
    assert runs[True][0] == runs[False][0]
    assert torch.equal(runs[True][1], runs[False][1])

    assert trainer._next_inputs is not None and trainer._next_inputs[0] == 3
    trainer.step = 1  # as after a resume: the prefetched inputs (for step 3) must not be used
    used = []
    plain = trainer.loss_for
    trainer.loss_for = lambda indices, inputs=None, **kw: used.append(inputs) or plain(indices, inputs=inputs, **kw)
    trainer.train_step()
    fresh = trainer.step_inputs(trainer.plan.batch(1), sample_seeds=[trainer.t.seed * 1_000_003 + 10_007])
    assert used[0].indices == fresh.indices and torch.equal(used[0].noise, fresh.noise)
    assert torch.equal(used[0].sigmas, fresh.sigmas)
