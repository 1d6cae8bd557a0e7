"""Low-rank and sparse update ops: the one place that picks a backend per call.

`ADAPTERLAB_BACKEND` = `auto` (default: Triton for CUDA tensors when triton imports, torch
otherwise), `torch`, or `triton` (on CPU only with `TRITON_INTERPRET=1`, the interpreter the tests
use). The torch implementations in `reference.py` are the CPU backend and the test oracle.
"""
from __future__ import annotations

import functools
import os

from torch import Tensor

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


def use_triton(t: Tensor) -> bool:
    """Whether the op on tensor `t` runs the Triton kernels (never a GPU launch on CPU)."""
    choice = os.environ.get("ADAPTERLAB_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ConfigError(f"ADAPTERLAB_BACKEND={choice!r}; use one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "triton":
        if not triton_available():
            raise ConfigError("ADAPTERLAB_BACKEND=triton but triton is not installed; pip install 'adapterlab[triton]'")
        if not (t.is_cuda or interpreted):
            raise ConfigError(f"ADAPTERLAB_BACKEND=triton with a {t.device.type} tensor: Triton runs on CUDA, or on "
                              "the CPU with TRITON_INTERPRET=1 (slow; for tests)")
        return True
    return t.is_cuda and triton_available()


def lora_add(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float = 0.0, seed: int = 0) -> Tensor:
    """out + scale · drop_p(x) Aᵀ Bᵀ (added into `out` in place where it can be)."""
    if use_triton(x):
        from .lora import lora_add as triton_lora_add

        return triton_lora_add(out, x, A, B, scale, p, seed)
    return reference.lora_add(out, x, A, B, scale, p, seed)


def sparse_linear_add(out: Tensor, x: Tensor, values: Tensor, indices: Tensor, shape: tuple[int, int],
                      transposed: bool = False, scale: float = 1.0, fixed_values: Tensor | None = None,
                      fixed_indices: Tensor | None = None) -> Tensor:
    """out + scale · x·ΔWᵀ for a sparse ΔW (see `reference.SparseLinearAdd`)."""
    return reference.sparse_linear_add(out, x, values, indices, shape, transposed, scale, fixed_values,
                                       fixed_indices)


__all__ = ["BACKENDS", "lora_add", "sparse_linear_add", "use_triton"]
