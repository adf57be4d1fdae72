"""One training-like step of a tiny Qwen-Image transformer, for tests that compare two routings of its blocks."""

import torch


def tiny_transformer_step(tr, seed: int = 0):
    """Forward and backward of the tiny transformer on fixed inputs (16 image tokens, 7 text tokens whose input
    takes a gradient, as the token's path does): its output, the text input's gradient and every parameter's
    gradient (cleared afterwards)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 64, generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 7, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    out = tr(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]],
             return_dict=False)[0]
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None}
    tr.zero_grad(set_to_none=True)
    return out.detach(), ctx.grad.clone(), grads
