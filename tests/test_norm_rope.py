"""training/norm_rope.py: Qwen-Image's q/k RMSNorm, RoPE and joint concatenation as custom operators."""

import copy

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from qwen_zero_prior.training import attention_qwen, norm_rope, reductions, rope
from qwen_zero_prior.training.config import ATTENTION_TARGETS
from qwen_zero_prior.training.lora import add_lora
from transformer_step import tiny_transformer_step


def _inputs(batch=2, s_img=6, s_txt=5, heads=3, dim=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    img = (torch.randn(batch, s_img, heads, dim, generator=g) * 3).to(torch.bfloat16)
    txt = (torch.randn(batch, s_txt, heads, dim, generator=g) * 3).to(torch.bfloat16)
    norms = []
    for _ in range(2):
        norm = RMSNorm(dim, eps=1e-6).to(torch.bfloat16).requires_grad_(False)
        norm.weight.copy_(1 + 0.2 * torch.randn(dim, generator=g))
        norms.append(norm.to(device))
    freqs = [torch.polar(torch.ones(n, dim // 2), torch.rand(n, dim // 2, generator=g) * 6.3) for n in (s_img, s_txt)]
    return img.to(device), txt.to(device), norms, [f.to(device) for f in freqs]


def _eager(img, txt, norms, freqs):
    """What diffusers' processor computes (with rope.py's real RoPE, which training compiles)."""
    q_img = rope.apply_rotary_emb_qwen_real(norms[0](img), freqs[0], use_real=False)
    q_txt = rope.apply_rotary_emb_qwen_real(norms[1](txt), freqs[1], use_real=False)
    return torch.cat([q_txt, q_img], dim=1)


def _grads(fn, img, txt, dout):
    img, txt = img.detach().requires_grad_(True), txt.detach().requires_grad_(True)
    out = fn(img, txt)
    out.backward(dout)
    return out.detach(), img.grad, txt.grad


def test_reference_is_diffusers_rms_norm_then_rope():
    """The reference forward is diffusers' RMSNorm module then the real RoPE, bit for bit, from complex frequencies
    and from rope.tables' real tables."""
    img, _, norms, freqs = _inputs()
    want = rope.apply_rotary_emb_qwen_real(norms[0](img), freqs[0], use_real=False)
    for f in (freqs[0], rope.tables(freqs[0])):
        got = norm_rope.norm_rope_reference(img, norms[0].weight, norms[0].eps, norm_rope.freq_pairs(f))
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_written_out_backward_is_autograds():
    """The written-out backward gives autograd's gradient of the eager norm + RoPE, within one bf16 rounding of
    the largest (autograd's float32 steps in another order), and most elements exactly."""
    img, _, norms, freqs = _inputs(s_img=64, heads=4, dim=32)
    dout = torch.randn(img.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x = img.detach().requires_grad_(True)
    rope.apply_rotary_emb_qwen_real(norms[0](x), freqs[0], use_real=False).backward(dout)
    got = norm_rope.norm_rope_backward_reference(dout, img, norms[0].weight, norms[0].eps,
                                                 norm_rope.freq_pairs(freqs[0]))
    assert got.dtype == torch.bfloat16 and got.shape == img.shape
    diff = (got.float() - x.grad.float()).abs()
    assert diff.max() <= 2 ** -7 * x.grad.float().abs().max()
    assert (diff == 0).float().mean() > 0.9


def test_joint_operator_is_the_processors_concatenation_with_its_gradients():
    """The operator (reference code off CUDA) gives the processor's joint text-then-image tensor exactly, and
    gradients for both streams within bf16 rounding of autograd's through the eager path."""
    img, txt, norms, freqs = _inputs()
    dout = torch.randn(2, 11, 3, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = _grads(lambda i, t: _eager(i, t, norms, freqs), img, txt, dout)
    got = _grads(lambda i, t: norm_rope.joint(i, t, norms[0], norms[1], *freqs), img, txt, dout)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() <= 2 ** -7 * b.float().abs().max()
    with torch.device("meta"):
        fake = norm_rope.norm_rope_joint(img.to("meta"), txt.to("meta"), norms[0].weight.to("meta"),
                                         norms[1].weight.to("meta"), *(norm_rope.freq_pairs(f).to("meta")
                                                                       for f in freqs), 1e-6, 1e-6)
    assert fake.shape == want[0].shape and fake.dtype == torch.bfloat16


def _tiny(pipe):
    tr = pipe.transformer.to(torch.bfloat16)
    add_lora(tr, rank=4, alpha=4, targets=list(ATTENTION_TARGETS), seed=0)
    for p in tr.parameters():
        if p.requires_grad:  # LoRA B starts at zero: random, so every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.05)
    assert attention_qwen.install(tr) == len(tr.transformer_blocks)
    return tr


def _close(a, b, rel):
    a, b = a.float(), b.float()
    return (a - b).norm() <= rel * b.norm()


def test_processor_routed_through_the_operator_gives_the_same_step(tiny_pipe):
    """The tiny transformer with its processors routed through the operator: the same output (exactly: the forward
    is the same code on the CPU), and the text input's and every LoRA weight's gradients within bf16 rounding; the
    operator ran once for queries and once for keys in every block; uninstall routes them back."""
    tr = _tiny(tiny_pipe)
    rope.install(rope.QWEN_IMAGE_MODULE)
    try:
        want = tiny_transformer_step(tr)
        n = norm_rope.install(tr)
        assert n == len(tr.transformer_blocks) == norm_rope.installed(tr) > 0
        calls = []
        real = norm_rope.norm_rope_joint

        def spy(*args):
            calls.append(args[0].shape)
            return real(*args)

        norm_rope.norm_rope_joint = spy  # the module global joint() looks up: proves the operator ran
        try:
            got = tiny_transformer_step(tr)
        finally:
            norm_rope.norm_rope_joint = real
    finally:
        rope.uninstall()
    assert len(calls) == 2 * n
    assert torch.equal(got[0], want[0])
    assert _close(got[1], want[1], 2 ** -7)
    assert got[2].keys() == want[2].keys() and got[2]
    for name in want[2]:
        assert _close(got[2][name], want[2][name], 2 ** -6), name
    assert norm_rope.uninstall(tr) == n and norm_rope.installed(tr) == 0 and norm_rope.uninstall(tr) == 0


@pytest.mark.parametrize("case", ["float32 weights", "a trained norm", "diffusers' processor"])
def test_install_only_where_the_operator_computes_the_same(tiny_pipe, case):
    """Norms in float32, a norm weight that trains, or diffusers' own processor (no shared-input LoRA) are left as
    they are."""
    tr = tiny_pipe.transformer.requires_grad_(False)  # frozen, as training leaves everything but the LoRA
    if case != "float32 weights":
        tr.to(torch.bfloat16)
    if case != "diffusers' processor":
        attention_qwen.install(tr)
    if case == "a trained norm":
        tr.transformer_blocks[0].attn.norm_k.weight.requires_grad_(True)
        assert norm_rope.install(tr) == len(tr.transformer_blocks) - 1
        assert not tr.transformer_blocks[0].attn.processor.fused_norm_rope
    else:
        assert norm_rope.install(tr) == 0


def test_joint_operator_compiles_as_one_graph():
    """The operator traces whole (``fullgraph=True``), forward and backward, and the compiled numbers are the eager
    ones."""
    pytest.importorskip("torch._inductor", reason="torch without inductor: compile SKIPPED")
    import torch._dynamo

    img, txt, norms, freqs = _inputs()
    dout = torch.randn(2, 11, 3, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def fn(i, t):
        return norm_rope.joint(i, t, norms[0], norms[1], *freqs)

    want = _grads(fn, img, txt, dout)
    torch._dynamo.reset()
    got = _grads(torch.compile(fn, fullgraph=True), img, txt, dout)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_compiled_training_routes_the_attention(tiny_pipe):
    """``accelerate_transformer`` (both backends and the ComfyUI node's engine) turns the operator on under
    ``model.compile`` where the family's rewrites put the shared-input processor, and not without compile."""
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.diffusers_backend import accelerate_transformer

    for compile_ in (False, True):
        tr = copy.deepcopy(tiny_pipe.transformer).to(torch.bfloat16)
        add_lora(tr, rank=4, alpha=4, targets=list(ATTENTION_TARGETS), seed=0)
        try:
            accelerate_transformer(tr, ModelConfig(compile=compile_), (), compute_dtype=torch.bfloat16,
                                   rewrites=lambda t=tr: attention_qwen.install(t))
        finally:
            rope.uninstall()
            reductions.uninstall()
        assert norm_rope.installed(tr) == (len(tr.transformer_blocks) if compile_ else 0)


def test_operators_registered_once_and_reused_by_a_second_copy():
    """A second copy of the package (another ComfyUI folder name) finds the operators registered and reuses them."""
    norm_rope._ops()
    norm_rope._ops.cache_clear()  # as a fresh copy of the module would start
    again = norm_rope._ops()
    assert again == (torch.ops.qwen_zero_prior.norm_rope_joint, torch.ops.qwen_zero_prior.norm_rope_joint_backward)
    img, txt, norms, freqs = _inputs()
    assert torch.equal(norm_rope.joint(img, txt, norms[0], norms[1], *freqs), _eager(img, txt, norms, freqs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the Triton kernels against the reference")
@pytest.mark.parametrize("heads_per_program", [8, 16, None])  # the default, a group that masks heads, all
def test_triton_kernels_match_the_reference_on_the_gpu(heads_per_program, monkeypatch):
    """At the step's shapes (24 heads of 128; 4096 image and 128 text tokens), the kernels' outputs and gradients
    are the reference's within one bf16 rounding, nearly all exactly, however many heads a program takes."""
    pytest.importorskip("triton")
    monkeypatch.setattr(norm_rope, "HEADS_PER_PROGRAM", heads_per_program)
    img, txt, norms, freqs = _inputs(batch=1, s_img=4096, s_txt=128, heads=24, dim=128, device="cuda")
    dout = torch.randn(1, 4224, 24, 128, generator=torch.Generator().manual_seed(4)).to("cuda", torch.bfloat16)
    got = _grads(lambda i, t: norm_rope.joint(i, t, norms[0], norms[1], *freqs), img, txt, dout)
    cpu = [copy.deepcopy(n).cpu() for n in norms]
    want = _grads(lambda i, t: norm_rope.joint(i, t, cpu[0], cpu[1], *(f.cpu() for f in freqs)), img.cpu(),
                  txt.cpu(), dout.cpu())
    for a, b in zip(got, want):
        a, b = a.cpu().float(), b.float()
        diff = (a - b).abs()
        assert diff.max() <= 2 ** -7 * b.abs().max() and (diff == 0).float().mean() > 0.98


@pytest.mark.parametrize("per, want_block, want_groups, want_warps", [(8, 8, 3, 2), (16, 16, 2, 2), (None, 32, 1, 4)])
def test_kernels_launch_a_program_per_token_and_group_of_heads(per, want_block, want_groups, want_warps,
                                                                monkeypatch):
    """On the CPU with fake kernels recording the launches: each stream's kernels get a grid of (tokens, groups of
    HEADS_PER_PROGRAM heads) and that block (24 heads: 3 groups of 8 by default; all heads padded to 32 without);
    a value that is not a power of two is refused naming it."""
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((self.name, grid, meta["BLOCK_H"], meta["num_warps"]))

    monkeypatch.setattr(norm_rope, "_triton_kernels", lambda: (lambda n: 1 << (n - 1).bit_length(), Fake("fwd"),
                                                               Fake("bwd")))
    monkeypatch.setattr(norm_rope, "HEADS_PER_PROGRAM", per)
    img, txt = torch.zeros(1, 12, 24, 8, dtype=torch.bfloat16), torch.zeros(1, 5, 24, 8, dtype=torch.bfloat16)
    w, f = torch.ones(8, dtype=torch.bfloat16), torch.zeros(17, 4, 2)
    out = norm_rope._forward_cuda(img, txt, w, w, f[:12], f[12:], 1e-6, 1e-6)
    grads = norm_rope._backward_cuda(torch.zeros_like(out), img, txt, w, w, f[:12], f[12:], 1e-6, 1e-6)
    assert out.shape == (1, 17, 24, 8) and [g.shape for g in grads] == [img.shape, txt.shape]
    launch = (want_block, want_warps)
    assert calls == [("fwd", (5, want_groups), *launch), ("fwd", (12, want_groups), *launch),  # text, then image
                     ("bwd", (12, want_groups), *launch), ("bwd", (5, want_groups), *launch)]
    monkeypatch.setattr(norm_rope, "HEADS_PER_PROGRAM", 6)
    with pytest.raises(ValueError, match=r"HEADS_PER_PROGRAM=6: expected a power of two"):
        norm_rope._forward_cuda(img, txt, w, w, f[:12], f[12:], 1e-6, 1e-6)
