"""attention_qwen: Qwen-Image's joint attention with each stream's q/k/v LoRA A products as one matmul (peft's
numbers), installed with model.compile, and left out where diffusers' processor is not the one it follows."""

from __future__ import annotations

import pytest
import torch

from qwen_zero_prior.training import attention_qwen
from qwen_zero_prior.training.config import ATTENTION_TARGETS

QKV = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}


def _forward(tr, hidden, embeds, mask):
    bsz, h, w = hidden.shape[0], 4, 4
    return tr(hidden_states=hidden, timestep=torch.tensor([0.5, 0.7]), encoder_hidden_states=embeds,
              encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * bsz, return_dict=False)[0]


@pytest.mark.parametrize("products", [False, True, "delta"], ids=["default", "lora_product", "lora_delta"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded-caption"])
def test_shared_qkv_equals_peft_and_fuses_the_a_products(tiny_pipe, padded, products, monkeypatch):
    """The same output, input gradients and every lora_A / lora_B gradient as diffusers' processor with peft's
    layers, with no lora_A of the six q/k/v projections called on its own (one product per stream instead); with
    ``lora_shared.FLOAT32_WEIGHT_GRADS`` or ``FUSED_DELTA`` (each B product added to its base output by addmm,
    alpha 8 here so the scaling is not 1) to_out and to_add_out take lora_shared's products too."""
    from qwen_zero_prior.training import lora_shared
    from qwen_zero_prior.training.lora import add_lora

    monkeypatch.setattr(lora_shared, "FLOAT32_WEIGHT_GRADS", products is True)
    monkeypatch.setattr(lora_shared, "FUSED_DELTA", products == "delta")
    delta_calls = []
    real_delta = lora_shared._LoraDelta.apply
    monkeypatch.setattr(lora_shared._LoraDelta, "apply", lambda *a: delta_calls.append(1) or real_delta(*a))

    tr = tiny_pipe.transformer
    add_lora(tr, rank=4, alpha=8 if products == "delta" else 4, targets=ATTENTION_TARGETS, seed=0)
    g = torch.Generator().manual_seed(1)
    for name, p in tr.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give every adapter a visible contribution
            p.data = torch.randn(p.shape, generator=g) * 0.5
    hidden = torch.randn(2, 4, tr.config.in_channels, generator=g, requires_grad=True)
    embeds = torch.randn(2, 5, tr.config.joint_attention_dim, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if padded else None
    lora = {n: p for n, p in tr.named_parameters() if "lora_" in n}
    called = []
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: called.append(n.split(".lora_A")[0].split(".")[-1]))
             for n, m in tr.named_modules() if ".lora_A." in n]
    runs = []
    try:
        for fused in (False, True):
            if fused:
                assert attention_qwen.install(tr) == len(tr.transformer_blocks)
            for t in (hidden, embeds, *lora.values()):
                t.grad = None
            called.clear()
            out = _forward(tr, hidden, embeds, mask)
            out.square().sum().backward()
            runs.append((out.detach(), hidden.grad.clone(), embeds.grad.clone(),
                         {n: p.grad.clone() for n, p in lora.items() if p.grad is not None}, sorted(set(called))))
    finally:
        for h in hooks:
            h.remove()
    (ref, ref_dh, ref_de, ref_grads, ref_called), (got, got_dh, got_de, got_grads, got_called) = runs
    # float32 rounding of other summation orders (addmm's: ~1e-6 of the largest entry, the scaling 2 in it)
    tol = {"rtol": 1e-5, "atol": 1e-5 if products == "delta" else 1e-6}
    assert torch.allclose(got, ref, **tol)
    assert torch.allclose(got_dh, ref_dh, **tol)
    assert torch.allclose(got_de, ref_de, **tol)
    # every adapter but the last block's to_add_out (the last block's text stream is not used) has a gradient
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) == 2 * (8 * len(tr.transformer_blocks) - 1)
    for n in ref_grads:
        # fp32 rounding of other summation orders only
        assert (got_grads[n] - ref_grads[n]).abs().max() <= 1e-5 * ref_grads[n].abs().max(), n
        # the last block's text queries reach only its text output, which the model drops
        unused = n.startswith(f"transformer_blocks.{len(tr.transformer_blocks) - 1}.attn.add_q_proj.")
        assert (got_grads[n].abs().sum() > 0) != unused, n
    assert set(ref_called) == QKV | {"0", "to_add_out"}  # peft: every adapter's A on its own ("0": to_out.0)
    assert set(got_called) == (set() if products else {"0", "to_add_out"})  # the six q/k/v products fused
    assert len(delta_calls) == (8 * len(tr.transformer_blocks) if products == "delta" else 0)
    assert attention_qwen.uninstall(tr) == len(tr.transformer_blocks)
    assert {type(b.attn.processor).__name__ for b in tr.transformer_blocks} == {"QwenDoubleStreamAttnProcessor2_0"}


def test_install_keeps_the_attention_backend_and_uninstall_too(tiny_pipe):
    tr = tiny_pipe.transformer
    tr.set_attention_backend("_native_math")
    assert attention_qwen.install(tr) == len(tr.transformer_blocks)
    assert attention_qwen.install(tr) == 0  # already installed: nothing to do
    procs = [b.attn.processor for b in tr.transformer_blocks]
    assert {type(p).__name__ for p in procs} == {"SharedQkvAttnProcessor"}
    assert {str(p._attention_backend.value) for p in procs} == {"_native_math"}
    assert attention_qwen.uninstall(tr) == len(tr.transformer_blocks)
    assert {str(b.attn.processor._attention_backend.value) for b in tr.transformer_blocks} == {"_native_math"}


@pytest.mark.parametrize("version", ["0.41.2", "0.36.0"])
def test_an_older_diffusers_keeps_its_own_processor(tiny_pipe, monkeypatch, version, caplog):
    """Before 0.42 diffusers builds the joint mask elsewhere: its processor stays (logged), the step unchanged."""
    import logging

    import diffusers

    monkeypatch.setattr(diffusers, "__version__", version)
    with caplog.at_level(logging.INFO, logger=attention_qwen.__name__):
        assert attention_qwen.install(tiny_pipe.transformer) == 0
    assert f"diffusers {version}'s Qwen-Image attention processor is not the one followed here" in caplog.text
    assert {type(b.attn.processor).__name__ for b in tiny_pipe.transformer.transformer_blocks} == {
        "QwenDoubleStreamAttnProcessor2_0"}


def _new_argument(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                  attention_mask=None, image_rotary_emb=None, new_argument=None):
    raise ValueError("QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                     "Pass encoder_hidden_states_mask to let the processor build the joint mask.")


def _old_mask_handling(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                       attention_mask=None, image_rotary_emb=None):
    raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")  # 0.36's only


@pytest.mark.parametrize("call", [_new_argument, _old_mask_handling], ids=["new-argument", "old-mask-handling"])
def test_another_processor_keeps_diffusers_processor(tiny_pipe, monkeypatch, call):
    """A processor with another signature, or with the one this follows but 0.36-0.41's mask handling (no
    joint-mask error), is not replaced, whatever diffusers' version says."""
    from diffusers.models.transformers import transformer_qwenimage as qi

    assert attention_qwen.supported()  # the installed 0.42's
    monkeypatch.setattr(qi.QwenDoubleStreamAttnProcessor2_0, "__call__", call)
    assert not attention_qwen.supported()
    assert attention_qwen.install(tiny_pipe.transformer) == 0


def test_compile_installs_it_and_eager_training_does_not(tiny_pipe, dataset_dir, make_config, tmp_path):
    import copy

    from qwen_zero_prior.training import rope
    from qwen_zero_prior.training.data import scan_dataset
    from qwen_zero_prior.training.trainer import Trainer

    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    eager = copy.deepcopy(tiny_pipe)
    Trainer(make_config(steps=1), eager, examples, tmp_path / "eager")
    assert {type(b.attn.processor).__name__ for b in eager.transformer.transformer_blocks} == {
        "QwenDoubleStreamAttnProcessor2_0"}
    cfg = make_config(steps=1)
    cfg.model.compile = True
    try:
        Trainer(cfg, tiny_pipe, examples, tmp_path / "compiled")
        assert {type(b.attn.processor).__name__ for b in tiny_pipe.transformer.transformer_blocks} == {
            "SharedQkvAttnProcessor"}
    finally:
        rope.uninstall()


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded-caption"])
def test_bshd_cudnn_attention_routes_the_cudnn_backend_only(tiny_pipe, monkeypatch, padded):
    """With ``attention_qwen.BSHD_CUDNN`` a processor whose backend is ``_native_cudnn`` computes attention through
    ``sdpa_bshd`` (here on SDPA's math backend: no cuDNN on the CPU) with the same output and gradients as
    diffusers' dispatch with the math backend; any other backend, or the switch off, keeps diffusers' dispatch."""
    from qwen_zero_prior.training.lora import add_lora
    from torch.nn.attention import SDPBackend

    tr = tiny_pipe.transformer
    add_lora(tr, rank=4, alpha=4, targets=ATTENTION_TARGETS, seed=0)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 4, tr.config.in_channels, generator=g, requires_grad=True)
    embeds = torch.randn(2, 5, tr.config.joint_attention_dim, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if padded else None
    calls = []
    real = attention_qwen.sdpa_bshd

    def on_math(q, k, v, attn_mask=None, backend=None):
        calls.append(q.shape)
        return real(q, k, v, attn_mask, backend=SDPBackend.MATH)

    monkeypatch.setattr(attention_qwen, "sdpa_bshd", on_math)
    assert attention_qwen.install(tr) == len(tr.transformer_blocks)
    runs = []
    for backend, bshd in (("_native_math", False), ("_native_math", True), ("_native_cudnn", True)):
        for proc in (b.attn.processor for b in tr.transformer_blocks):
            proc._attention_backend = backend  # what set_attention_backend stores (its check wants a GPU for cuDNN)
        monkeypatch.setattr(attention_qwen, "BSHD_CUDNN", bshd)
        hidden.grad = embeds.grad = None
        calls.clear()
        out = _forward(tr, hidden, embeds, mask)
        out.square().sum().backward()
        runs.append((out.detach(), hidden.grad.clone(), embeds.grad.clone(), len(calls)))
    (ref, ref_dh, ref_de, n0), (same, _, _, n1), (got, got_dh, got_de, n2) = runs
    assert (n0, n1, n2) == (0, 0, len(tr.transformer_blocks))
    assert torch.equal(same, ref)
    for a, b in ((got, ref), (got_dh, ref_dh), (got_de, ref_de)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: cuDNN attention")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_sdpa_bshd_is_diffusers_cudnn_attention_without_the_copies(compiled):
    """On CUDA ``sdpa_bshd`` gives diffusers' ``_native_cudnn`` output and q/k/v gradients (eager and compiled by
    inductor) at Qwen-Image's head shapes, and its output is contiguous [B, S, H, D] (cuDNN wrote it in the
    query's memory order), so flattening the heads is a view."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuDNN's fused attention needs sm80+")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1152, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dy = torch.randn(1, 1152, 24, 128, device="cuda", dtype=torch.bfloat16)

    def ours(a, b, c):
        return attention_qwen.sdpa_bshd(a, b, c, None)

    def theirs(a, b, c):
        return dispatch_attention_fn(a, b, c, backend="_native_cudnn")

    runs = []
    for fn in (theirs, ours):
        fn = torch.compile(fn) if compiled else fn
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dy)
        runs.append((out.detach(), *(t.grad for t in leaves), out.is_contiguous()))
    ref, got = runs
    assert got[4] and not ref[4]
    for a, b in zip(got[:4], ref[:4]):
        assert (a.float() - b.float()).abs().max() <= 2 ** -7 * b.float().abs().max()
