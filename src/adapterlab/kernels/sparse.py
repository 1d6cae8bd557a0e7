"""Triton kernels for sparse deltas: apply ΔW at sorted flat indices, and the sampled gradient.

- `sparse_apply(weight, indices, values, alpha)`: W.flat[idx] += alpha·values. Sorted unique
  indices (what SparseDelta stores) need no atomics: one load-add-store per entry; `unique=False`
  switches to atomic adds for index lists that may repeat.
- `sampled_grad(dy, x, rows, cols)`: dvalues[i] = Σ_t dY[t, rows_i]·X[t, cols_i] for the k
  selected entries only — never the dense dW. Entries sorted by row share their dY column, so a
  program takes a run of entries and streams the token dimension in chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _apply(w_ptr, idx_ptr, val_ptr, n, alpha, ATOMIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    idx = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    val = tl.load(val_ptr + offs, mask=live, other=0.0).to(tl.float32) * alpha
    if ATOMIC:
        tl.atomic_add(w_ptr + idx, val.to(w_ptr.dtype.element_ty), mask=live)
    else:
        w = tl.load(w_ptr + idx, mask=live, other=0.0).to(tl.float32)
        tl.store(w_ptr + idx, (w + val).to(w_ptr.dtype.element_ty), mask=live)


def sparse_apply(
    weight: Tensor, indices: Tensor, values: Tensor, alpha: float = 1.0, unique: bool = True
) -> Tensor:
    """weight.flat[indices] += alpha·values, in place; atomics only when `unique=False`."""
    flat = weight.view(-1)
    n = indices.numel()
    if n:
        _apply[(triton.cdiv(n, 1024),)](flat, indices, values, n, alpha, ATOMIC=not unique, BLOCK=1024)
    return weight


@triton.jit
def _sampled(
    dy_ptr,
    x_ptr,
    rows_ptr,
    cols_ptr,
    out_ptr,
    k,
    T,
    s_dt,
    s_dn,
    s_xt,
    s_xk,
    alpha,
    BLOCK: tl.constexpr,
    BT: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < k
    rows = tl.load(rows_ptr + offs, mask=live, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offs, mask=live, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        t = (t0 + tl.arange(0, BT)).to(tl.int64)
        m = (t[:, None] < T) & live[None, :]
        dy = tl.load(dy_ptr + t[:, None] * s_dt + rows[None, :] * s_dn, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + t[:, None] * s_xt + cols[None, :] * s_xk, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(dy * xv, axis=0)
    tl.store(out_ptr + offs, (acc * alpha).to(out_ptr.dtype.element_ty), mask=live)


def sampled_grad(
    dy: Tensor,
    x: Tensor,
    rows: Tensor,
    cols: Tensor,
    alpha: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """alpha · Σ_t dy[t, rows_i]·x[t, cols_i] for each i: the gradient of the k values of a sparse
    ΔW (out×in) from dY (T×out) and X (T×in), without forming dW."""
    k = rows.numel()
    out = torch.empty(k, dtype=out_dtype or x.dtype, device=x.device)
    if k:
        _sampled[(triton.cdiv(k, 64),)](
            dy,
            x,
            rows,
            cols,
            out,
            k,
            dy.shape[0],
            dy.stride(0),
            dy.stride(1),
            x.stride(0),
            x.stride(1),
            alpha,
            BLOCK=64,
            BT=32,
        )
    return out
