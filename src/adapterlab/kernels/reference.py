"""Plain-torch implementations: the CPU backend and the oracle the Triton kernels are tested against."""
from __future__ import annotations

import torch
from torch import Tensor


def dropout_mask(like: Tensor, p: float, seed: int) -> Tensor:
    """The keep-mask (already divided by 1-p) that `seed` stands for; regenerated in backward so no
    dropped copy of the input is ever stored."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    keep = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    keep.bernoulli_(1.0 - p, generator=gen)
    return keep.mul_(1.0 / (1.0 - p))


class LoRAAdd(torch.autograd.Function):
    """out + scale · dropout(x) Aᵀ Bᵀ, saving only x, A, B and the small x·Aᵀ."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, A: Tensor, B: Tensor,  # type: ignore[override]
                scale: float, p: float, seed: int) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
        if p > 0:
            xa = xa * dropout_mask(xa, p, seed)
        h = xa @ A.t()
        out2 = out.reshape(-1, out.shape[-1])
        if out2.dtype == h.dtype:
            y = torch.addmm(out2, h, B.t(), alpha=scale)
        else:
            y = out2 + (h @ B.t()).mul_(scale).to(out2.dtype)
        ctx.save_for_backward(x, A, B, h)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, A, B, h = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        if g2.dtype != A.dtype:
            g2 = g2.to(A.dtype)
        gh = (g2 @ B).mul_(ctx.scale)                      # d h, (N, r)
        dA = dB = dx = None
        mask = None
        if ctx.needs_input_grad[3]:
            dB = (g2.t() @ h).mul_(ctx.scale)
        if ctx.needs_input_grad[2]:
            xa = x.reshape(-1, x.shape[-1]).to(A.dtype)
            if ctx.p > 0:
                mask = dropout_mask(xa, ctx.p, ctx.seed)
                xa = xa * mask
            dA = gh.t() @ xa
        if ctx.needs_input_grad[1]:
            dx2 = gh @ A
            if ctx.p > 0:
                dx2 = dx2 * (mask if mask is not None else dropout_mask(dx2, ctx.p, ctx.seed))
            dx = dx2.to(x.dtype).view(x.shape)
        return grad, dx, dA, dB, None, None, None


def lora_add(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float = 0.0,
             seed: int = 0) -> Tensor:
    """Reference low-rank update for Linear layouts: out + scale · drop_p(x) Aᵀ Bᵀ."""
    return LoRAAdd.apply(out, x, A, B, scale, p, seed)
