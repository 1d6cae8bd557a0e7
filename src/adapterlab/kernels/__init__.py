"""Low-rank and sparse update ops: the one place that picks a backend per call.

`ADAPTERLAB_BACKEND` = `torch`, `triton` (on CPU only with `TRITON_INTERPRET=1`, the interpreter
the tests use), or `auto` (default): torch on CPU; on CUDA, each op takes the backend that measured
faster there (docs/benchmarks.md, H200, bf16, K = N = 4096):

- LoRA forward/backward: torch (cuBLAS). Our Triton kernels were 1.27-2.5× the base GEMM at 8192
  tokens against torch's 1.13-1.21×, and far slower at 16-512 tokens, where launch cost dominates.
- Multi-adapter routing: Triton's grouped kernel from `GROUPED_MIN_TOKENS` tokens (1.3× faster than
  the per-adapter torch loop at 8192 tokens; 4.7× slower at 512).

The torch implementations in `reference.py` are the CPU backend and the test oracle.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import reference

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


GROUPED_MIN_TOKENS = 4096


def use_triton(t: Tensor, auto: bool = False) -> bool:
    """Whether an op on tensor `t` runs the Triton kernels (never a GPU launch on CPU). `auto` is
    the op's own verdict for this call when the backend is `auto` (only ever taken on CUDA)."""
    choice = os.environ.get("ADAPTERLAB_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ConfigError(f"ADAPTERLAB_BACKEND={choice!r}; use one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "triton":
        if not triton_available():
            raise ConfigError(
                "ADAPTERLAB_BACKEND=triton but triton is not installed; pip install 'adapterlab[triton]'"
            )
        if not (t.is_cuda or interpreted):
            raise ConfigError(
                f"ADAPTERLAB_BACKEND=triton with a {t.device.type} tensor: Triton runs on CUDA, or on "
                "the CPU with TRITON_INTERPRET=1 (slow; for tests)"
            )
        return True
    return auto and t.is_cuda and triton_available()


def lora_add(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float = 0.0) -> Tensor:
    """out + scale · drop_p(x) Aᵀ Bᵀ (added into `out` in place where it can be). Under autocast
    the torch path runs the products in autocast's dtype; the Triton kernels in the adapter's.
    The torch path draws its dropout mask from torch's global RNG inside the traced graph; only
    the Triton path, which regenerates its mask from a seed in every kernel, draws a Python seed."""
    if use_triton(x, auto=False):
        from .lora import lora_add as triton_lora_add

        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        with torch.autocast(x.device.type, enabled=False):
            return triton_lora_add(out, x, A, B, scale, p, seed)
    return reference.lora_add(out, x, A, B, scale, p)


_PLAIN = (torch.Tensor, nn.Parameter, type(None))


def linear_lora(
    base: nn.Module, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float = 0.0
) -> Tensor | None:
    """base(x) + scale · drop_p(x) Aᵀ Bᵀ for a plain nn.Linear `base` without hooks, or None where
    no special path applies (another base, a quantized / subclass weight, autocast,
    `torch.compile`, the Triton backend): the caller then runs the base layer and `lora_add`.

    Training: one autograd node (`reference.LinearLoRA`: the LoRA input gradient is accumulated into
    the base's). Inference in fp32/fp64 with enough tokens (`reference.folds_cheaper`): one GEMM with
    the transient weight W + scale·B·A (`reference.folded_linear`), the merged layer's output."""
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return None
    W, bias = base.weight, base.bias
    if (
        not all(type(t) in _PLAIN for t in (x, W, A, B, bias))  # no quantized / subclass weights
        or torch.is_autocast_enabled(x.device.type)
        or torch.compiler.is_compiling()
        or use_triton(x)
    ):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W, A, B, bias)):
        return reference.linear_lora(x, W, bias, A, B, scale, p)
    if p == 0 and reference.folds_cheaper(x, W, A):
        return reference.folded_linear(x, W, bias, A, B, scale)
    return None


def grouped_lora_add(
    out: Tensor, x: Tensor, token_ids: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float]
) -> Tensor:
    """out[t] += scales[g]·x[t]·A_gᵀ·B_gᵀ with g = token_ids[t] (-1: no adapter), in place."""
    tokens = x.numel() // x.shape[-1]
    if use_triton(x, auto=tokens >= GROUPED_MIN_TOKENS):
        from .lora import grouped_lora_add as triton_grouped

        return triton_grouped(out, x, token_ids, As, Bs, scales)
    return reference.grouped_lora_add(out, x, token_ids, As, Bs, scales)


def routed_lora_add(
    out: Tensor, x: Tensor, slots: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float]
) -> Tensor:
    """out + scales[g]·x_i·A_gᵀ·B_gᵀ for every sample i (dim 0) with g = slots[i] (-1: none), for
    inference and training. Per-sample batched products (`reference.per_sample_lora_add`) wherever
    gradients are needed or a sample holds enough tokens for them (≥ 2·r: gathering each sample's
    factors costs less than gathering its rows of x and scattering into `out`); otherwise the
    token-grouped op, on CUDA the Triton kernel from `GROUPED_MIN_TOKENS` tokens."""
    samples = x.shape[0]
    per_sample = x.numel() // max(1, samples * x.shape[-1])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *As, *Bs))
    if grad or (
        per_sample >= 2 * max(a.shape[0] for a in As)
        and not use_triton(x, auto=samples * per_sample >= GROUPED_MIN_TOKENS)
    ):
        return reference.per_sample_lora_add(out, x, slots, As, Bs, scales)
    return grouped_lora_add(out, x, slots.to(x.device).repeat_interleave(per_sample), As, Bs, scales)


def sparse_linear_add(
    out: Tensor,
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    shape: tuple[int, int],
    transposed: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """out + scale · x·ΔWᵀ for a sparse ΔW (see `reference.SparseLinearAdd`)."""
    return reference.sparse_linear_add(out, x, values, indices, shape, transposed, scale)


__all__ = [
    "BACKENDS",
    "GROUPED_MIN_TOKENS",
    "grouped_lora_add",
    "linear_lora",
    "lora_add",
    "routed_lora_add",
    "sparse_linear_add",
    "use_triton",
]
