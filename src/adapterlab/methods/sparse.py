"""`SparseDelta`: a ΔW that is zero except at a sorted set of flat positions (LT-SFT, SaRA).

State: `indices` (a persistent buffer of sorted flat positions in the base weight's own layout,
int32 when the weight has fewer than 2³¹ entries, else int64) and `values` (the trainable 1-D
parameter, one entry per index). The gradient, AdamW's two moments and the indices are therefore
O(k), whatever the size of the weight.

- nn.Linear / transformers Conv1D: the forward is one autograd function
  (`kernels.sparse_linear_add`): ΔW is scattered into a dense temporary for the matmul and freed;
  the backward rebuilds it for the input gradient and computes the values' gradient as a sampled
  product (one dot product per index), never the dense dW.
- nn.Conv1d/2d/3d: ΔW is scattered into a dense temporary and convolved; autograd gathers the
  values' gradient from the conv's dense weight gradient, which lives only during backward.
- nn.Embedding (targeted by name, never by a keyword): ΔW has the weight's (num_embeddings, dim)
  layout and the output is out + ΔW[x]. Only the rows of the tokens in the batch are built (a
  (distinct tokens, dim) table from the support entries in those rows), so neither the forward
  nor the backward holds a dense (num_embeddings, dim) tensor.

Merging adds ΔW to the base weight; unmerging writes back the saved original entries at the
support, so merge → unmerge is bit-exact (`Delta.restores_exactly`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import quant
from ..config import AdapterConfig
from ..errors import ConfigError, HotswapError, UnsupportedModuleError
from ..experts import ExpertWeights
from ..kernels import sparse_linear_add
from ..kernels.reference import scatter_dense
from ..layer import Delta, base_weight
from ..targeting import is_conv, is_embedding, is_hf_conv1d, is_linear
from .lora import adapter_dtype, conv_like

INT32_LIMIT = 2**31 - 1


def index_dtype(numel: int) -> torch.dtype:
    """int32 when every flat position of a `numel`-entry weight fits, else int64."""
    return torch.int32 if numel <= INT32_LIMIT else torch.int64


def sparse_unsupported(module: nn.Module) -> str | None:
    """None if `SparseDelta` can wrap `module`, else why not (for `AdapterConfig.supports`)."""
    if quant.is_quantized(module):
        return quant.entrywise_refusal(module)
    if is_embedding(module) and getattr(module, "max_norm", None) is not None:
        return (
            "an nn.Embedding with max_norm renormalizes its weight in place at every lookup, so a delta "
            "beside it would not equal the merged weight; use an embedding without max_norm"
        )
    if is_linear(module) or is_conv(module) or is_embedding(module) or isinstance(module, ExpertWeights):
        return None
    return (
        "a sparse delta wraps nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, nn.Embedding and stacked "
        "MoE expert weights"
    )


def check_indices(indices: Tensor, numel: int, what: str = "indices") -> Tensor:
    """`indices` as a 1-D index tensor of `index_dtype(numel)`, after checking that they are
    integers, strictly increasing and inside [0, numel). Raises `ConfigError` naming the problem."""
    if (
        not isinstance(indices, Tensor)
        or indices.dim() != 1
        or indices.is_floating_point()
        or indices.is_complex()
        or indices.dtype == torch.bool
    ):
        got = (
            f"a {indices.dim()}-D {indices.dtype} tensor"
            if isinstance(indices, Tensor)
            else type(indices).__name__
        )
        raise ConfigError(f"{what} must be a 1-D integer tensor of flat positions, got {got}")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= numel:
            bad = low if low < 0 else high
            raise ConfigError(
                f"{what} hold position {bad}, outside the weight's {numel} entries "
                f"(valid: 0 to {numel - 1}); were they made for a weight of another shape?"
            )
        if bool((indices[1:] <= indices[:-1]).any()):
            raise ConfigError(
                f"{what} must be strictly increasing (sorted, no repeats); "
                "pass torch.unique(indices), which sorts and removes repeats"
            )
    return indices.to(index_dtype(numel))


class SparseDelta(Delta):
    """ΔW = `values` at the flat positions `indices` of the base weight, zero elsewhere."""

    indices: Tensor  # a buffer (register_buffer)
    restores_exactly = True

    def __init__(self, config: AdapterConfig, base: nn.Module, indices: Tensor | None = None) -> None:
        super().__init__(config)
        reason = sparse_unsupported(base)
        if reason:
            raise UnsupportedModuleError(f"{config.method}: {reason}; got {type(base).__name__}")
        weight = base_weight(base)
        self.weight_shape = tuple(weight.shape)
        self.transposed = is_hf_conv1d(base)
        self._weight_space = isinstance(base, ExpertWeights)  # forward adds ΔW to the weight (experts.py)
        self._embedding = is_embedding(base)
        self._conv = None if is_linear(base) or self._weight_space or self._embedding else conv_like(base)
        if indices is None:
            indices = torch.zeros(0, dtype=index_dtype(self.numel), device=weight.device)
        idx = check_indices(indices.to(weight.device), self.numel)
        self.register_buffer("indices", idx)
        self.values = nn.Parameter(
            torch.zeros(idx.numel(), dtype=adapter_dtype(weight), device=weight.device)
        )

    @property
    def numel(self) -> int:
        """Entries of the base weight."""
        return math.prod(self.weight_shape)

    @property
    def k(self) -> int:
        """Trained entries."""
        return self.indices.numel()

    @torch.no_grad()
    def set_support(self, indices: Tensor, values: Tensor | None = None) -> None:
        """Train exactly these flat positions from now on (values start at `values`, else 0).
        The `values` parameter stays the same object, so add it to an optimizer after this call
        (or drop its optimizer state), and its gradient is cleared."""
        idx = check_indices(indices.to(self.indices.device), self.numel)
        if values is not None and tuple(values.shape) != (idx.numel(),):
            raise ConfigError(
                f"values has shape {tuple(values.shape)}; it needs one entry per index, ({idx.numel()},)"
            )
        self.indices = idx
        self.values.data = (
            torch.zeros(idx.numel(), dtype=self.values.dtype, device=idx.device)
            if values is None
            else values.detach().to(self.values.dtype).clone()
        )
        self.values.grad = None

    def delta_weight(self) -> Tensor:
        return scatter_dense(self.weight_shape, self.values, self.indices)

    def support(self) -> Tensor:
        return self.indices

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        if self._weight_space:
            return out + (self.delta_weight() * scale).to(out.dtype)
        if self._embedding:
            return out + (self._rows(x) * scale).to(out.dtype)
        if self._conv is not None:
            dw = self.delta_weight()
            return out + (self._conv(x.to(dw.dtype), dw) * scale).to(out.dtype)
        # not a conv, so weight_shape is a Linear's (or Conv1D's) 2-d shape
        shape: tuple[int, int] = self.weight_shape  # type: ignore[assignment]
        return sparse_linear_add(out, x, self.values, self.indices, shape, self.transposed, scale)

    def _rows(self, x: Tensor) -> Tensor:
        """ΔW[x] for token ids `x`: a table of the batch's distinct tokens' rows of ΔW, filled from
        the support entries in those rows (differentiable in the values), indexed by `x`."""
        dim = self.weight_shape[1]
        tokens, inverse = torch.unique(x, return_inverse=True)  # sorted
        flat = self.indices.long()
        rows = flat // dim
        where = torch.searchsorted(tokens, rows).clamp_(max=max(tokens.numel() - 1, 0))
        hit = (tokens[where] == rows).nonzero().flatten() if tokens.numel() else where[:0]
        table = self.values.new_zeros(tokens.numel() * dim).index_put(
            (where[hit] * dim + flat[hit] % dim,), self.values[hit]
        )
        return table.view(tokens.numel(), dim)[inverse]

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, weight_shape={self.weight_shape}, density={self.k / max(self.numel, 1):.4g}, "
            f"dtype={self.values.dtype}"
        )


def check_swapped_indices(where: str, path: str, delta: Delta, own: dict[str, Tensor]) -> None:
    """Hot-swap: a sparse delta's indices from a file must be a support this weight can hold."""
    if isinstance(delta, SparseDelta) and "indices" in own:
        try:
            check_indices(own["indices"], delta.numel, what=f"{path}.indices in the file")
        except ConfigError as e:
            raise HotswapError(f"{where}: {e}") from None
