"""Triton kernels for the low-rank update, behind the same call as `reference.lora_add`.

Every op of LoRA's forward and backward is one matrix product with, at most, the dropout mask
applied to one operand or to the result — so one kernel, `_mm`, serves all six of them:

    forward   h  = drop(x) Aᵀ                  (mask on the left operand)
              out += s · h Bᵀ                  (accumulate into the base output, in place)
    backward  dh = s · dY B
              dB = s · dYᵀ h
              dA = dhᵀ drop(x)                 (mask on the right operand)
              dx = drop'(dh A)                 (mask on the result)

The mask is never stored: entry (t, k) of x is kept when `tl.rand(seed, t·K + k) >= p`, so each
kernel regenerates exactly the entries it touches. Strides make every transpose free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

NO_MASK, MASK_A, MASK_B, MASK_C = 0, 1, 2, 3


@triton.jit
def _mm(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    s_cm,
    s_cn,
    s_cs,
    k_per_split,
    alpha,
    p,
    seed,
    mask_ld,
    size_key,
    MASK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """C (+)= alpha · op(A) @ op(B); the dropout keep-mask is indexed token-major with row length
    `mask_ld`, tokens being the rows of A (MASK_A), of B (MASK_B) or of C (MASK_C). Program axis 2
    splits K: split s covers [s·k_per_split, (s+1)·k_per_split) and writes C + s·s_cs."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(split * k_per_split, tl.minimum(K, (split + 1) * k_per_split), BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(
            a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak,
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn,
            mask=(rk[:, None] < K) & (rn[None, :] < N),
            other=0.0,
        )
        if MASK == 1:
            keep = tl.rand(seed, rm.to(tl.int64)[:, None] * mask_ld + rk[None, :]) >= p
            a = tl.where(keep, a, 0.0)
        if MASK == 2:
            keep = tl.rand(seed, rk.to(tl.int64)[:, None] * mask_ld + rn[None, :]) >= p
            b = tl.where(keep, b, 0.0)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b.to(a.dtype))
    if MASK == 3:
        keep = tl.rand(seed, rm.to(tl.int64)[:, None] * mask_ld + rn[None, :]) >= p
        acc = tl.where(keep, acc, 0.0)
    acc = acc * alpha
    c_ptrs = c_ptr + split.to(tl.int64) * s_cs + rm[:, None] * s_cm + rn[None, :] * s_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# Large problems on a GPU pick their tiles by measurement; `size_key` buckets shapes by powers of
# two so a training run with varying sequence lengths tunes a handful of times, not every step.
# `restore_value`: tuning runs the kernel repeatedly, and an accumulating C must not see that.
_TUNE_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 32, 8, 3),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 32, 64, 4, 4),
        (64, 32, 128, 4, 4),
        (32, 128, 128, 4, 4),
        (128, 16, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (64, 64, 128, 4, 3),
        (256, 64, 32, 8, 3),
    ]
]
_mm_tuned = triton.autotune(_TUNE_CONFIGS, key=["size_key", "MASK", "ACCUMULATE"], restore_value=["c_ptr"])(
    _mm
)
_TUNE_FROM = 1 << 22  # M·N·K above which a CUDA launch is tuned
_SMS: dict[int, int] = {}


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _splits(programs: int, k: int, bk: int, device: torch.device) -> int:
    """Split a long reduction (dA, dB sum over every token) when the output tile grid alone would
    leave most of the GPU idle."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(triton.cdiv(k, 8 * bk), (2 * _SMS[index]) // max(programs, 1)))


def matmul(
    a: Tensor,
    b: Tensor,
    c: Tensor,
    *,
    alpha: float = 1.0,
    accumulate: bool = False,
    mask: int = NO_MASK,
    p: float = 0.0,
    seed: int = 0,
    mask_ld: int = 0,
    split: int | None = None,
) -> Tensor:
    """c (+)= alpha · a @ b for 2-D views of any strides; returns c. With `split` > 1 the K range
    is cut into that many parts reduced in fp32 partials (deterministic, no atomics)."""
    (m, k), (k2, n) = a.shape, b.shape
    assert k == k2 and c.shape == (m, n), (a.shape, b.shape, c.shape)
    ieee = torch.float32 in (a.dtype, b.dtype) or a.dtype != b.dtype
    bm, bn, bk = _block(m, 64), _block(n, 64), _block(k, 32)
    tiles = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    tuned = c.is_cuda and m * n * k >= _TUNE_FROM
    split = split or _splits(tiles[0] * tiles[1], k, bk, c.device)
    unit = 128 if tuned else bk  # split boundaries fall on a multiple of every BK in use
    per = triton.cdiv(triton.cdiv(k, split), unit) * unit
    split = triton.cdiv(k, per) if k else 1
    if split == 1:
        target, s_cs = c, 0
    else:
        target = torch.empty(split, m, n, dtype=torch.float32, device=c.device)
        s_cs = target.stride(0)
    t2 = target if split == 1 else target[0]
    args = (
        a,
        b,
        target,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        t2.stride(0),
        t2.stride(1),
        s_cs,
        per if k else 1,
        alpha,
        p,
        seed,
        mask_ld,
        m.bit_length() * 4096 + n.bit_length() * 64 + k.bit_length(),
    )
    flags = dict(MASK=mask, ACCUMULATE=accumulate and split == 1, IEEE=ieee)
    if tuned:
        _mm_tuned[lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]), split)](
            *args, **flags
        )
    else:
        grid = (*tiles, split)  # not `_mm[(*tiles, split)]`: mypy reads that as 3.11-only syntax
        _mm[grid](*args, **flags, BM=bm, BN=bn, BK=bk)
    if split > 1:
        total = target.sum(0)
        if accumulate:
            total += c
        c.copy_(total)
    return c


@triton.jit
def _keep_mask(out_ptr, n, p, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """The boolean keep-mask the kernels use for an input of `shape` (for tests and debugging)."""
    n = int(torch.tensor(shape).prod()) if shape else 1
    out = torch.empty(n, dtype=torch.int8, device=device)
    _keep_mask[(triton.cdiv(n, 1024),)](out, n, p, seed, BLOCK=1024)
    return out.view(shape).bool()


class TritonLoRAAdd(torch.autograd.Function):
    """Same contract as `reference.LoRAAdd`: out + scale · drop(x) Aᵀ Bᵀ, added in place into
    `out` when it can be; saves x, A, B and the small x·Aᵀ."""

    @staticmethod
    def forward(
        ctx,
        out: Tensor,
        x: Tensor,
        A: Tensor,
        B: Tensor,
        scale: float,
        p: float,
        seed: int,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        keep = 1.0 / (1.0 - p) if p > 0 else 1.0
        h = torch.empty(x2.shape[0], A.shape[0], dtype=A.dtype, device=x.device)
        matmul(
            x2, A.t(), h, alpha=keep, mask=MASK_A if p > 0 else NO_MASK, p=p, seed=seed, mask_ld=x2.shape[1]
        )
        ctx.save_for_backward(x, A, B, h)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        in_place = out.is_contiguous() and not (out.is_leaf and out.requires_grad)
        target = out if in_place else out.contiguous().clone()
        matmul(h, B.t(), target.view(-1, target.shape[-1]), alpha=scale, accumulate=True)
        if in_place:
            ctx.mark_dirty(out)
        return target

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, A, B, h = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        p, seed, m, k = ctx.p, ctx.seed, x2.shape[0], x2.shape[1]
        keep = 1.0 / (1.0 - p) if p > 0 else 1.0
        dh = matmul(g2, B, torch.empty(m, A.shape[0], dtype=A.dtype, device=x.device), alpha=ctx.scale)
        dA = dB = dx = None
        if ctx.needs_input_grad[3]:
            dB = matmul(g2.t(), h, torch.empty_like(B), alpha=ctx.scale)
        if ctx.needs_input_grad[2]:
            dA = matmul(
                dh.t(),
                x2,
                torch.empty_like(A),
                alpha=keep,
                mask=MASK_B if p > 0 else NO_MASK,
                p=p,
                seed=seed,
                mask_ld=k,
            )
        if ctx.needs_input_grad[1]:
            dx2 = matmul(
                dh,
                A,
                torch.empty(m, k, dtype=x.dtype, device=x.device),
                alpha=keep,
                mask=MASK_C if p > 0 else NO_MASK,
                p=p,
                seed=seed,
                mask_ld=k,
            )
            dx = dx2.view(x.shape)
        return grad, dx, dA, dB, None, None, None


def lora_add(
    out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float = 0.0, seed: int = 0
) -> Tensor:
    return TritonLoRAAdd.apply(out, x, A, B, scale, p, seed)


# -- several adapters in one batch --------------------------------------------------------------------
@triton.jit
def _grouped_mm(
    a_ptr,
    b_ptr,
    c_ptr,
    order_ptr,
    table_ptr,
    N,
    K,
    s_am,
    s_ak,
    s_bg,
    s_bk,
    s_bn,
    s_cm,
    s_cn,
    SHRINK: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One block of rows of one adapter. SHRINK: h[i] = x[order[i]] @ A_gᵀ (rows gathered);
    else out[order[i]] += h[i] @ B_gᵀ (rows scattered; each row belongs to one block)."""
    blk = tl.program_id(0)
    g = tl.load(table_ptr + blk * 3)
    start = tl.load(table_ptr + blk * 3 + 1)
    end = tl.load(table_ptr + blk * 3 + 2)
    if start >= end:  # padding block: the grid is sized without a host sync
        return
    rm = start + tl.arange(0, BM)
    valid = rm < end
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    token = tl.load(order_ptr + rm, mask=valid, other=0)
    a_rows = token if SHRINK else rm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(
            a_ptr + a_rows.to(tl.int64)[:, None] * s_am + rk[None, :] * s_ak,
            mask=valid[:, None] & (rk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + g.to(tl.int64) * s_bg + rk[:, None] * s_bk + rn[None, :] * s_bn,
            mask=(rk[:, None] < K) & (rn[None, :] < N),
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b.to(a.dtype))
    c_mask = valid[:, None] & (rn[None, :] < N)
    if SHRINK:
        tl.store(
            c_ptr + rm.to(tl.int64)[:, None] * s_cm + rn[None, :] * s_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=c_mask,
        )
    else:
        c_ptrs = c_ptr + token.to(tl.int64)[:, None] * s_cm + rn[None, :] * s_cn
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _block_table(ids: Tensor, groups: int, bm: int) -> tuple[Tensor, Tensor, int]:
    """Tokens sorted by adapter id (-1 first, skipped) and (adapter, start, end) per block of ≤ bm
    rows of one adapter. The table has a fixed upper-bound length (extra rows are empty blocks),
    so building it needs no device-to-host sync."""
    bound = triton.cdiv(ids.numel(), bm) + groups
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids.clamp(min=-1) + 1, minlength=groups + 1)[1:]
    seg_end = torch.cumsum(counts, 0) + (ids.numel() - counts.sum())
    seg_start = seg_end - counts
    blocks = (counts + bm - 1) // bm
    ends = torch.cumsum(blocks, 0)
    b = torch.arange(bound, device=ids.device)
    group = torch.searchsorted(ends, b, right=True)
    live = group < groups
    g = group.clamp(max=groups - 1)
    start = seg_start[g] + (b - (ends[g] - blocks[g])) * bm
    end = torch.minimum(start + bm, seg_end[g])
    table = torch.stack([g, torch.where(live, start, 0), torch.where(live, end, 0)], 1)
    return order, table.to(torch.int64).contiguous(), bound


def grouped_lora_add(
    out: Tensor, x: Tensor, token_ids: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float]
) -> Tensor:
    """out[t] += scales[g]·x[t]·A_gᵀ·B_gᵀ for the adapter g = token_ids[t] (-1: none), in place,
    for all adapters in two launches (ranks may differ: factors are zero-padded; the scale is
    folded into B)."""
    x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    r_max, dtype = max(a.shape[0] for a in As), As[0].dtype
    if all(a.shape[0] == r_max for a in As):
        a_all = torch.stack(As)
        b_all = torch.stack([b * s for b, s in zip(Bs, scales, strict=True)])
    else:
        a_all = torch.zeros(len(As), r_max, x2.shape[1], dtype=dtype, device=x.device)
        b_all = torch.zeros(len(Bs), out2.shape[1], r_max, dtype=dtype, device=x.device)
        for g, (a, b, s) in enumerate(zip(As, Bs, scales, strict=True)):
            a_all[g, : a.shape[0]] = a
            torch.mul(b, s, out=b_all[g, :, : b.shape[1]])
    bm = 64 if x2.shape[0] >= 4096 else 32
    order, table, bound = _block_table(token_ids.to(x.device), len(As), bm)
    h = torch.empty(x2.shape[0], r_max, dtype=dtype, device=x.device)
    ieee = torch.float32 in (x2.dtype, dtype) or x2.dtype != dtype
    _grouped_mm[(bound, triton.cdiv(r_max, _block(r_max, 64)))](
        x2,
        a_all,
        h,
        order,
        table,
        r_max,
        x2.shape[1],
        x2.stride(0),
        x2.stride(1),
        a_all.stride(0),
        a_all.stride(2),
        a_all.stride(1),
        h.stride(0),
        h.stride(1),
        SHRINK=True,
        IEEE=ieee,
        BM=bm,
        BN=_block(r_max, 64),
        BK=_block(x2.shape[1], 64),
    )
    bn = _block(out2.shape[1], 128)
    _grouped_mm[(bound, triton.cdiv(out2.shape[1], bn))](
        h,
        b_all,
        out2,
        order,
        table,
        out2.shape[1],
        r_max,
        h.stride(0),
        h.stride(1),
        b_all.stride(0),
        b_all.stride(2),
        b_all.stride(1),
        out2.stride(0),
        out2.stride(1),
        SHRINK=False,
        IEEE=ieee,
        BM=bm,
        BN=bn,
        BK=_block(r_max, 64),
    )
    return out
