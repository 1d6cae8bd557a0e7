"""Plain-torch implementations: the CPU backend and the oracle the Triton kernels are tested against."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def dropout_mask(like: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """A boolean keep-mask of `like`'s shape drawn from `generator` (torch's global RNG when None);
    the 1/(1-p) rescale is left to the caller.

    Each entry draws 16 random bits and is dropped when they fall below round(p·2¹⁶), so the drop
    rate is p to within 2⁻¹⁶. Slicing 64-bit draws into 16-bit ones makes this ~4× faster on the
    CPU than `bernoulli_`. With the global RNG it is plain tensor ops, so `torch.compile` traces it
    into the graph (no seed leaves the graph as a Python number)."""
    n = like.numel()
    size = ((n + 3) // 4,)
    if torch.compiler.is_compiling():  # dynamo traces randint, not random_'s open upper bound
        bits = torch.randint(
            -(2**63), 2**63 - 1, size, dtype=torch.int64, generator=generator, device=like.device
        )
    else:  # all 2⁶⁴ values: ~1.5× faster on the CPU than randint's range
        bits = torch.empty(size, dtype=torch.int64, device=like.device).random_(
            -(2**63), None, generator=generator
        )
    return bits.view(torch.int16)[:n].view(like.shape) >= round(p * 65536) - 32768


def compute_dtype(x: Tensor, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype the low-rank products run in: the autocast dtype of `x`'s device while autocast
    is on there (as for the base layer's own matmul), else the adapter's dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return adapter_dtype


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_bits(keep: Tensor, like: Tensor) -> Tensor | None:
    """The keep-mask as integers of `like`'s element size, all bits set where kept and zero where
    dropped (None where `like` has no integer of its size, e.g. fp8), for `apply_keep`."""
    bits = _SAME_SIZE_INT.get(like.element_size())
    return None if bits is None else keep.to(bits).neg_()


def apply_keep(t: Tensor, keep: Tensor, bits: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """`t` with the entries where `keep` is False set to +0.0, bit for bit `t.masked_fill(~keep, 0)`
    (NaN and -0.0 included), written into `out` when given (which may be `t`). Done as an AND of
    `t`'s bits with `keep_bits` (pass `bits` to reuse one): on the CPU `masked_fill` with a bool
    mask runs ~4× slower than converting the mask and one integer AND."""
    if bits is None:
        bits = keep_bits(keep, t)
    if bits is None:  # no integer of this size: the plain op
        return t.masked_fill_(~keep, 0) if out is t else t.masked_fill(~keep, 0)
    t_bits = t.view(bits.dtype)
    if out is None:
        return (t_bits & bits).view(t.dtype)
    torch.bitwise_and(t_bits, bits, out=out.view(bits.dtype))
    return out


def _shrink(x2: Tensor, A: Tensor, keep: Tensor | None) -> Tensor:
    """(x ⊙ keep) Aᵀ in A's dtype, without the 1/(1-p) rescale, which callers fold into rank-r
    tensors."""
    xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
    if keep is not None:
        xa = apply_keep(xa, keep)
    return xa @ A.t()


def _expand_into(out: Tensor, h: Tensor, B: Tensor, alpha: float) -> tuple[Tensor, bool]:
    """out + alpha·h·Bᵀ (h and B of one dtype), in place when `out` allows it; returns (result, in_place).
    Never in place under `torch.compile`: the compiler fuses the add itself, and AOT autograd
    mishandles an in-place write (`mark_dirty`) into a view such as HF Conv1D's output."""
    bt = B.t().contiguous()  # (r, out) row-major: MKL's skinny addmm runs up to 2× faster than on Bᵀ's view
    if (
        out.dtype == h.dtype
        and out.is_contiguous()
        and not (out.is_leaf and out.requires_grad)
        and not torch.compiler.is_compiling()
    ):
        out.view(-1, out.shape[-1]).addmm_(h, bt, alpha=alpha)
        return out, True
    return out + (h @ bt).mul_(alpha).to(out.dtype).view(out.shape), False


def _column_major(t: Tensor) -> Tensor:
    """`t` stored column-major (transposed contiguous): MKL's skinny products g·B and gh·A with the
    rank-r factors run 1.5–4× faster on that layout than on the row-major parameters."""
    return t.t().contiguous().t()


def _factor_grads(
    g2: Tensor,
    xd: Tensor,
    A: Tensor,
    B: Tensor,
    h: Tensor,
    keep: Tensor | None,
    alpha: float,
    need_A: bool,
    need_B: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The LoRA factors' side of a backward, shared by `LoRAAdd` and `LinearLoRA`: gh = α·g·B
    (the gradient of (x ⊙ keep)Aᵀ, (N, r)), dA and dB when needed, and the keep-mask's bits (one
    conversion for dA and dx). `g2` and `xd` are 2-D in the adapter's dtype, `h` = (x ⊙ keep)Aᵀ."""
    dtype = h.dtype
    gh = (g2 @ _column_major(B.to(dtype))).mul_(alpha)
    dB = (g2.t() @ h).mul_(alpha).to(B.dtype) if need_B else None
    bits = None if keep is None else keep_bits(keep, xd)
    dA = None
    if need_A:
        dA = (gh.t() @ (xd if keep is None else apply_keep(xd, keep, bits))).to(A.dtype)
    return gh, dA, dB, bits


class LoRAAdd(torch.autograd.Function):
    """out + scale · dropout(x) Aᵀ Bᵀ, with the products in `dtype` (the adapter's, or autocast's:
    see `compute_dtype`). Dropout is given as its boolean keep-mask `keep` (None: no dropout; see
    `dropout_mask`) and its rate `p`, drawn by the caller, so this Function holds no RNG. Saves x (in `dtype`: under autocast the same half-size copy the base
    layer's matmul makes), A, B, the small x·Aᵀ and, with dropout, the boolean keep-mask (a
    quarter of an fp32 copy of x; PEFT keeps the dropped copy itself).

    The update is added into `out` in place (`mark_dirty`) when `out` is contiguous and of
    `dtype`: `out` is the base layer's fresh output, which no op saves, and a new
    activation-sized buffer per adapted layer costs measurable time on CPU. Dropout's 1/(1-p) is
    applied to rank-r tensors only. Gradients are returned in each input's own dtype."""

    @staticmethod
    def forward(
        ctx,
        out: Tensor,
        x: Tensor,
        A: Tensor,
        B: Tensor,
        scale: float,
        p: float,
        keep: Tensor | None,
        dtype: torch.dtype,
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # every dtype below is explicit
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            keep = None if keep is None else keep.reshape(x2.shape)
            h = _shrink(x2, A.to(dtype), keep)  # (x ⊙ keep) Aᵀ: the true h times (1-p)
            ctx.save_for_backward(x2, A, B, h, keep)
            ctx.alpha, ctx.x_shape, ctx.x_dtype = scale / (1.0 - p), x.shape, x.dtype
            result, in_place = _expand_into(out, h, B.to(dtype), ctx.alpha)
        if in_place:
            ctx.mark_dirty(out)
        return result

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, A, B, h, keep = ctx.saved_tensors
        dtype = h.dtype
        with torch.autocast(grad.device.type, enabled=False):
            g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
            gh, dA, dB, bits = _factor_grads(
                g2, x2, A, B, h, keep, ctx.alpha, ctx.needs_input_grad[2], ctx.needs_input_grad[3]
            )
            dx = None
            if ctx.needs_input_grad[1]:
                dx2 = gh @ _column_major(A.to(dtype))
                if keep is not None:
                    apply_keep(dx2, keep, bits, out=dx2)
                dx = dx2.to(ctx.x_dtype).view(ctx.x_shape)
        return grad, dx, dA, dB, None, None, None, None


def lora_add(
    out: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reference low-rank update for Linear layouts: out + scale · drop_p(x) Aᵀ Bᵀ, in autocast's
    dtype under autocast (`compute_dtype`), the dropout mask drawn from `generator` (torch's global
    RNG when None, which keeps the whole call traceable by `torch.compile`). Without a gradient to
    compute it skips the autograd Function (its bookkeeping is ~3% of a forward)."""
    dtype = compute_dtype(x, A.dtype)
    keep = dropout_mask(x, p, generator) if p > 0 else None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, x, A, B)):
        return LoRAAdd.apply(out, x, A, B, scale, p, keep, dtype)
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        h = _shrink(x2, A.to(dtype), None if keep is None else keep.reshape(x2.shape))
        return _expand_into(out, h, B.to(dtype), scale / (1.0 - p))[0]


class LinearLoRA(torch.autograd.Function):
    """F.linear(x, W, bias) + scale · dropout(x) Aᵀ Bᵀ as one autograd node, for a plain
    nn.Linear base and no autocast (`dtype`: the adapter's). Forward is exactly the base layer's
    `F.linear` followed by `LoRAAdd`'s update, added in place into that fresh output. Backward
    computes the base's input gradient g·W and accumulates the LoRA part into it with one
    `addmm_`, instead of autograd summing two activation-sized gradients; W's and the bias's
    gradients are computed only if they are needed. Saves what the base layer and `LoRAAdd`
    save together (x, W, A, B, the small x·Aᵀ and the keep-mask), nothing more."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        W: Tensor,
        bias: Tensor | None,
        A: Tensor,
        B: Tensor,
        scale: float,
        p: float,
        keep: Tensor | None,
        dtype: torch.dtype,
    ) -> Tensor:
        out = F.linear(x, W, bias)
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 if x2.dtype == dtype else x2.to(dtype)
        keep = None if keep is None else keep.reshape(x2.shape)
        h = _shrink(xd, A.to(dtype), keep)
        ctx.save_for_backward(x2, W, A, B, h, keep)
        ctx.alpha, ctx.x_shape, ctx.has_bias = scale / (1.0 - p), x.shape, bias is not None
        return _expand_into(out, h, B.to(dtype), ctx.alpha)[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, W, A, B, h, keep = ctx.saved_tensors
        dtype = h.dtype
        g = grad.reshape(-1, grad.shape[-1])
        g2 = g if g.dtype == dtype else g.to(dtype)
        xd = x2 if x2.dtype == dtype else x2.to(dtype)
        gh, dA, dB, bits = _factor_grads(
            g2, xd, A, B, h, keep, ctx.alpha, ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        )
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx2 = g @ W
            a = _column_major(A.to(dtype))
            if keep is None and dx2.dtype == dtype:
                dx2.addmm_(gh, a)
            else:
                lora = gh @ a
                if keep is not None:
                    apply_keep(lora, keep, bits, out=lora)
                dx2.add_(lora.to(dx2.dtype))
            dx = dx2.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dW = g.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dW, db, dA, dB, None, None, None, None


def linear_lora(
    x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float = 0.0
) -> Tensor:
    """F.linear(x, W, bias) + scale · drop_p(x) Aᵀ Bᵀ through `LinearLoRA` (outside autocast), the
    dropout mask drawn from torch's global RNG as `lora_add` draws it."""
    keep = dropout_mask(x, p) if p > 0 else None
    return LinearLoRA.apply(x, W, bias, A, B, scale, p, keep, A.dtype)


FOLD_DTYPES = (torch.float32, torch.float64)


def folds_cheaper(x: Tensor, W: Tensor, A: Tensor) -> bool:
    """Whether inference through the folded weight W + s·B·A (`folded_linear`) is the cheaper way
    for this call: W and the factors in fp32/fp64 (in a half dtype the fold would round the update
    into W, as a merge does; there the unfolded product is kept), and enough tokens that the fold's
    2·r·N·K multiply-adds, plus its N×K write, cost less than the 2·r·M·(N + K) of the two skinny
    products: M·(N + K) ≥ 2·N·K (measured crossover on a 2-core CPU: 1.4-2× the flop parity)."""
    if W.dtype not in FOLD_DTYPES or A.dtype != W.dtype or x.dtype != W.dtype or W.dim() != 2:
        return False
    n, k = W.shape
    return n * k > 0 and (x.numel() // k) * (n + k) >= 2 * n * k


def folded_linear(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """F.linear(x, W + scale·B·A, bias): the merged layer's output, computed with a transient
    weight that is freed after the call (inference; W itself is never written)."""
    return F.linear(x, torch.addmm(W, B.to(W.dtype), A.to(W.dtype), alpha=scale), bias)


def grouped_lora_add(
    out: Tensor, x: Tensor, token_ids: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float]
) -> Tensor:
    """out[t] += scales[g]·x[t]·A_gᵀ·B_gᵀ with g = token_ids[t] (-1: none), one gather/scatter
    per adapter (inference; training routes through each delta's own autograd)."""
    x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    for g, (a, b, s) in enumerate(zip(As, Bs, scales, strict=True)):
        rows = (token_ids == g).nonzero().flatten().to(x.device)
        if rows.numel():
            h = x2.index_select(0, rows).to(a.dtype) @ a.t()
            out2.index_add_(0, rows, (h @ b.t()).mul_(s).to(out2.dtype))
    return out


def per_sample_lora_add(
    out: Tensor, x: Tensor, slots: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float]
) -> Tensor:
    """out + scales[g]·x_i·A_gᵀ·B_gᵀ for every sample i (dim 0 of x and out) with g = slots[i]
    (-1: none), as two batched products over the samples: each sample's factors are picked from the
    stacked ones (ranks zero-padded to the largest, a zero pair for -1), so x is never gathered and
    `out` never scattered. Differentiable in x, out and the factors; in autocast's dtype under
    autocast. Without gradients the update is added into `out` in place where it can be."""
    dtype = compute_dtype(x, As[0].dtype)
    samples, k, n = x.shape[0], x.shape[-1], out.shape[-1]
    r = max(a.shape[0] for a in As)
    with torch.autocast(x.device.type, enabled=False):
        a = torch.stack(
            [F.pad(a.to(dtype), (0, 0, 0, r - a.shape[0])) for a in As] + [x.new_zeros((r, k), dtype=dtype)]
        )
        bt = torch.stack(
            [F.pad((b.t() * s).to(dtype), (0, 0, 0, r - b.shape[1])) for b, s in zip(Bs, scales, strict=True)]
            + [x.new_zeros((r, n), dtype=dtype)]
        )
        pick = torch.where(slots < 0, len(As), slots).to(x.device)
        h = torch.bmm(x.reshape(samples, -1, k).to(dtype), a.index_select(0, pick).transpose(1, 2))
        b_pick = bt.index_select(0, pick)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (out, h, b_pick))
        if grad or out.dtype != dtype or not out.is_contiguous() or torch.compiler.is_compiling():
            return out + torch.bmm(h, b_pick).to(out.dtype).view(out.shape)
        out.view(samples, -1, n).baddbmm_(h, b_pick)
        return out


# -- sparse updates ---------------------------------------------------------------------------------
def scatter_dense(shape: tuple[int, ...], values: Tensor, indices: Tensor) -> Tensor:
    """The dense tensor of `shape` that holds `values` at the flat positions `indices` and zeros
    elsewhere. Differentiable in the values."""
    numel = 1
    for n in shape:
        numel *= n
    return values.new_zeros(numel).index_put((indices.long(),), values).view(shape)


@torch.library.custom_op("adapterlab::sampled_matmul", mutates_args=())
def sampled_matmul(left_t: Tensor, right: Tensor, indices: Tensor, shape: list[int]) -> Tensor:
    """(left_t @ right).flatten()[indices] without forming the product: one dot product per index
    (an SDDMM). `left_t` is (a, N), `right` (N, b), `indices` sorted flat positions in (a, b).

    A `torch.library` custom op: `torch.compile` sees one opaque op whose output has the shape of
    `indices` (see the fake implementation below) instead of tracing the CSR build, whose
    `bincount` has a data-dependent shape and would break the graph."""
    a, b = shape
    if indices.numel() == 0:
        return right.new_zeros(0)
    rows, cols = torch.div(indices, b, rounding_mode="floor"), indices % b
    crow = torch.zeros(a + 1, dtype=indices.dtype, device=indices.device)
    crow[1:] = torch.bincount(rows, minlength=a).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": not actionable for users
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(
            crow, cols, right.new_zeros(indices.numel()), (a, b), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, left_t, right, beta=0.0).values().clone()


@sampled_matmul.register_fake
def _(left_t: Tensor, right: Tensor, indices: Tensor, shape: list[int]) -> Tensor:
    return right.new_empty(indices.shape)


class SparseLinearAdd(torch.autograd.Function):
    """out + scale · x·ΔWᵀ for a Linear layout (ΔW stored (out, in)), or out + scale · x·ΔW for HF
    Conv1D's transposed layout (stored (in, out)), where the stored ΔW is zero except at the sorted
    flat `indices`, which hold `values`.

    ΔW is built densely only for the duration of forward and of backward; nothing dense is saved.
    The gradient of `values` is the sampled product dvalues[i] = scale · Σ_t dY[t, r_i]·X[t, c_i]
    (an SDDMM), never the dense dW.
    """

    @staticmethod
    def forward(
        ctx,
        out: Tensor,
        x: Tensor,
        values: Tensor,
        indices: Tensor,
        shape: tuple[int, int],
        transposed: bool,
        scale: float,
    ) -> Tensor:
        stored = scatter_dense(shape, values, indices)
        w = stored if transposed else stored.t()  # (in, out): y = x @ w
        x2 = x.reshape(-1, x.shape[-1])
        xv = x2 if x2.dtype == values.dtype else x2.to(values.dtype)
        out2 = out.reshape(-1, out.shape[-1])
        if out2.dtype == xv.dtype:
            y = torch.addmm(out2, xv, w, alpha=scale)
        else:
            y = out2 + (xv @ w).mul_(scale).to(out2.dtype)
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.transposed, ctx.scale = shape, transposed, scale
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, values, indices = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        if g2.dtype != values.dtype:
            g2 = g2.to(values.dtype)
        dx = dvalues = None
        if ctx.needs_input_grad[1]:
            stored = scatter_dense(ctx.shape, values.detach(), indices)
            w = stored if ctx.transposed else stored.t()
            dx = (g2 @ w.t()).mul_(ctx.scale).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1]).to(values.dtype)
            # the stored layout's gradient is leftᵀ·right: dYᵀ·X (Linear) or Xᵀ·dY (Conv1D)
            left, right = (x2, g2) if ctx.transposed else (g2, x2)
            dvalues = sampled_matmul(left.t(), right, indices, list(ctx.shape)).mul_(ctx.scale)
        return grad, dx, dvalues, None, None, None, None


def sparse_linear_add(
    out: Tensor,
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    shape: tuple[int, int],
    transposed: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """Reference sparse update for Linear / HF Conv1D layouts; see `SparseLinearAdd`."""
    return SparseLinearAdd.apply(out, x, values, indices, tuple(shape), transposed, scale)
