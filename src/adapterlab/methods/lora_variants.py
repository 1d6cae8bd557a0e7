"""LoRA on `nn.Embedding`, and DoRA (weight-decomposed LoRA) on Linear / Conv1D / ConvNd / Embedding,
in PEFT's layouts (docs/methods/lora.md#dora).

Embedding (PEFT's layout): A = `lora_embedding_A` (r, num_embeddings), B = `lora_embedding_B`
(embedding_dim, r); ΔW = s·(B·A)ᵀ, forward = out + s·embedding(x, Aᵀ)·Bᵀ. A starts at zero and B
normal, as PEFT's. Dropout does not apply (the input is token ids).

DoRA (Liu et al. 2024, as PEFT defines it): with V = W + s·ΔW_lora, the adapted weight is
W' = m ⊙ V / ‖V‖, the norm taken per output (per row of a Linear's (out, in) weight, per output
channel of a conv, per embedding dimension of an embedding) and treated as a constant in backward;
m (`lora_magnitude_vector`) starts at ‖W‖, so W' = W at start. ΔW = W' − W depends on W, so merge
keeps the weight it replaces (`restores_exactly`) and unmerge writes it back, bit-exact. The forward
pass adds (m/‖V‖ − 1)·base(x) + (m/‖V‖)·s·lora(x) to the output, base(x) being the base module
without bias on the (dropped-out) input, as PEFT computes it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import quant
from ..errors import UnsupportedModuleError
from ..layer import Delta, base_weight
from ..targeting import is_conv, is_embedding, is_hf_conv1d, is_linear
from .lora import KernelConvLoRA, LinearLoRA, ReshapeConvLoRA, adapter_dtype, conv_like


class EmbeddingLoRA(Delta):
    """LoRA on an `nn.Embedding`, PEFT's tensor names (`lora_embedding_A` / `lora_embedding_B`)."""

    peft_compatible = True
    refactorable = False  # not in LowRankDelta's factor layout: combined into dense or sparse only

    def __init__(self, config: Any, base: nn.Module, r: int, scaling: float) -> None:
        super().__init__(config)
        base = cast(nn.Embedding, base)
        if base.max_norm is not None:
            raise UnsupportedModuleError(
                f"{config.method}: an Embedding with max_norm={base.max_norm} renormalises the weight it "
                "looks up in place, so a low-rank factor cannot go through it; exclude it"
            )
        weight = base_weight(base)
        n_tokens, dim = weight.shape
        dtype = adapter_dtype(weight)
        self.lora_embedding_A = nn.Parameter(torch.zeros((r, n_tokens), dtype=dtype, device=weight.device))
        b = torch.empty((dim, r), dtype=dtype, device=weight.device)
        self.lora_embedding_B = nn.Parameter(nn.init.normal_(b) if b.device.type != "meta" else b)
        self.padding_idx = base.padding_idx
        self.scaling = scaling

    def delta_weight(self) -> Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def _lora_out(self, x: Tensor) -> Tensor:
        """embedding(x, Aᵀ)·Bᵀ, unscaled."""
        return (
            F.embedding(x, self.lora_embedding_A.t(), padding_idx=self.padding_idx)
            @ self.lora_embedding_B.t()
        )

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        return out + (self._lora_out(x) * (self.scaling * scale)).to(out.dtype)

    def extra_repr(self) -> str:
        r, n_tokens = self.lora_embedding_A.shape
        return f"r={r}, num_embeddings={n_tokens}, embedding_dim={self.lora_embedding_B.shape[0]}"


class _DoRA(Delta):
    """What every DoRA layout shares; a subclass also derives from its LoRA layout's class, whose
    `delta_weight()` is s·ΔW_lora, and says where the output dimension is (`out_dim`: of the
    base weight) and how to run the base module without bias (`_base_out`) and the factors
    (`_lora_out`, unscaled) on an input."""

    restores_exactly = True  # ΔW reads W: merge keeps W, unmerge writes it back
    refactorable = False  # ΔW is not s·B·A: hot-swap padding and factor concatenation refuse it
    out_dim = 0  # where the base weight's output dimension is
    out_channel = -1  # ... and the output's (a conv's: 1)
    lora_magnitude_vector: nn.Parameter
    scaling: float

    def _attach(self, base: nn.Module, magnitude_shape: tuple[int, ...]) -> None:
        if quant.is_quantized(base):
            raise UnsupportedModuleError(
                f"{self.config.method}: DoRA on a quantized base ({type(base).__name__}) is not supported; "
                "use plain LoRA (use_dora=False) on quantized weights"
            )
        self.__dict__["base_module"] = base  # not a submodule: the delta's state is its own tensors only
        weight = base_weight(base)  # (a skeleton's placeholder too: the file's magnitude replaces it)
        with torch.no_grad():
            norm = self._norm(weight.to(adapter_dtype(weight)))
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(magnitude_shape))

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return not _placeholder(base_weight(self.__dict__["base_module"]))

    def _weight(self) -> Tensor:
        weight = _real_weight(self.__dict__["base_module"], "DoRA")
        return weight.to(adapter_dtype(weight))

    def _norm(self, v: Tensor) -> Tensor:
        """‖v‖ per output: (n_out,)."""
        return torch.linalg.vector_norm(v.movedim(self.out_dim, 0).reshape(v.shape[self.out_dim], -1), dim=1)

    def _per_output(self, values: Tensor, ndim: int, dim: int) -> Tensor:
        shape = [1] * ndim
        shape[dim] = -1
        return values.reshape(shape)

    def _scale(self, weight: Tensor) -> Tensor:
        """m / ‖W + s·ΔW_lora‖ per output, the norm detached (DoRA §4.3, as PEFT)."""
        v = weight + super().delta_weight().detach()  # the LoRA layout's s·ΔW
        return self.lora_magnitude_vector.reshape(-1) / self._norm(v).detach()

    def delta_weight(self) -> Tensor:
        weight = self._weight()
        v = weight + super().delta_weight()
        scale = self.lora_magnitude_vector.reshape(-1) / self._norm(v)
        return self._per_output(scale, v.dim(), self.out_dim) * v - weight

    def factors(self) -> tuple[Tensor, Tensor]:
        raise UnsupportedModuleError(
            "a DoRA delta's ΔW is not s·B·A (its magnitude rescales each output), so its factors cannot "
            "be concatenated; combine with how='svd' or 'linear'"
        )

    def routing_factors(self) -> tuple[Tensor, Tensor, float] | None:
        return None

    def forward_with_base(self, base: nn.Module, x: Tensor, scale: float) -> Tensor | None:
        return None  # not LinearLoRA's fused base + LoRA: DoRA rescales the base output

    def _input(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        weight = self._weight()
        mns = self._scale(weight)
        h = self._input(x)
        base, lora = self._base_out(h, weight), self._lora_out(h)
        mns = self._per_output(mns, base.dim(), self.out_channel % base.dim())
        return out + (((mns - 1) * base + mns * lora * self.scaling) * scale).to(out.dtype)


class DoRALinear(_DoRA, LinearLoRA):
    """DoRA on nn.Linear or transformers' Conv1D (its weight (in, out): the output is dim 1)."""

    def __init__(self, config: Any, base: nn.Module, r: int, scaling: float) -> None:
        LinearLoRA.__init__(self, config, base, r, scaling)
        self.out_dim = 1 if self.transposed else 0
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._attach(base, (self.lora_B.weight.shape[0],))

    def _input(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.drop(x.to(self.lora_A.weight.dtype)))

    def _base_out(self, h: Tensor, weight: Tensor) -> Tensor:
        return F.linear(h, weight.t() if self.transposed else weight)

    def _lora_out(self, h: Tensor) -> Tensor:
        return F.linear(F.linear(h, self.lora_A.weight), self.lora_B.weight)


class _DoRAConv(_DoRA):
    """DoRA on Conv1d/2d/3d; the magnitude is stored (1, C_out, 1, …) as PEFT stores it."""

    out_channel = 1

    def _setup(self, base: nn.Module) -> None:
        weight = base_weight(base)
        self._attach(base, (1, weight.shape[0], *[1] * (weight.dim() - 2)))

    def _input(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.drop(x.to(self.lora_A.weight.dtype)))

    def _base_out(self, h: Tensor, weight: Tensor) -> Tensor:
        return cast(Tensor, self.conv(h, weight))


class DoRAKernelConv(_DoRAConv, KernelConvLoRA):
    """DoRA on a conv, PEFT's kernel layout."""

    def __init__(self, config: Any, base: nn.Module, r: int, scaling: float) -> None:
        KernelConvLoRA.__init__(self, config, cast(Any, base), r, scaling)
        self._setup(base)

    def _lora_out(self, h: Tensor) -> Tensor:
        y = self.conv(h, self.lora_A.weight)
        return _conv_b(y, self.lora_B.weight, self.groups)


class DoRAReshapeConv(_DoRAConv, ReshapeConvLoRA):
    """DoRA on a conv, loralib's reshape layout (not PEFT-loadable)."""

    def __init__(self, config: Any, base: nn.Module, r: int, scaling: float) -> None:
        ReshapeConvLoRA.__init__(self, config, cast(Any, base), r, scaling)
        self._setup(base)

    def _lora_out(self, h: Tensor) -> Tensor:
        dw = ReshapeConvLoRA.delta_weight(self) / self.scaling
        return self.conv(h, dw)


class DoRAEmbedding(_DoRA, EmbeddingLoRA):
    """DoRA on an nn.Embedding: the norm per embedding dimension (PEFT's: of the (dim, tokens) view)."""

    out_dim = 1

    def __init__(self, config: Any, base: nn.Module, r: int, scaling: float) -> None:
        EmbeddingLoRA.__init__(self, config, base, r, scaling)
        self._attach(base, (self.lora_embedding_B.shape[0],))

    def _base_out(self, h: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(h, weight, padding_idx=self.padding_idx)


def _conv_b(h: Tensor, b: Tensor, groups: int) -> Tensor:
    """The kernel layout's B: a 1×1 conv r → C_out, grouped like the base."""
    return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[h.dim()](h, b, None, 1, 0, 1, groups)


class SavedModule(Delta):
    """A module PEFT trains and saves whole (`modules_to_save`: a new head, resized embeddings): a full
    copy of its weight (and bias), keys `<path>.weight` / `.bias` as PEFT's. Forward adds
    copy(x) − base(x); ΔW = W_copy − W, merged like DoRA (merge keeps W). A copy whose bias differs
    from the base's cannot be merged (merging writes weights only)."""

    restores_exactly = True
    refactorable = False
    peft_compatible = True

    def __init__(self, config: Any, base: nn.Module) -> None:
        super().__init__(config)
        if quant.is_quantized(base) or not (is_linear(base) or is_conv(base) or is_embedding(base)):
            raise UnsupportedModuleError(
                f"{config.method}: modules_to_save copies nn.Linear, Conv1D, ConvNd or nn.Embedding modules, "
                f"not a {type(base).__name__}; remove it from modules_to_save"
            )
        self.__dict__["base_module"] = base
        weight = base_weight(base)
        dtype = adapter_dtype(weight)
        self.weight = nn.Parameter(weight.detach().to(dtype, copy=True))
        bias = getattr(base, "bias", None)
        self.bias = nn.Parameter(bias.detach().to(dtype, copy=True)) if isinstance(bias, Tensor) else None

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        """Merging writes the weight only: True unless the copy's bias differs from the base's."""
        base = self.__dict__["base_module"]
        bias = getattr(base, "bias", None)
        if _placeholder(base_weight(base)):
            return False
        return self.bias is None or (
            isinstance(bias, Tensor) and torch.equal(self.bias, bias.to(self.bias.dtype))
        )

    def delta_weight(self) -> Tensor:
        weight = _real_weight(self.__dict__["base_module"], "a modules_to_save copy")
        return self.weight - weight.to(self.weight.dtype)

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        base = self.__dict__["base_module"]
        h = x if not x.is_floating_point() else x.to(self.weight.dtype)
        bias = getattr(base, "bias", None)
        own = _module_fn(base, h, base_weight(base).to(self.weight.dtype), bias)
        change = _module_fn(base, h, self.weight, self.bias) - own
        return out + (change * scale).to(out.dtype)


def _module_fn(base: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The base module's computation on `x` with another weight and bias."""
    if bias is not None:
        bias = bias.to(weight.dtype)
    if is_embedding(base):
        emb = cast(nn.Embedding, base)
        return F.embedding(x, weight, emb.padding_idx, None, 2.0, emb.scale_grad_by_freq, emb.sparse)
    if is_conv(base):
        y = conv_like(base)(x, weight)
        return y if bias is None else y + bias.reshape((-1,) + (1,) * (weight.dim() - 2))
    return F.linear(x, weight.t() if is_hf_conv1d(base) else weight, bias)


def _placeholder(weight: Tensor) -> bool:
    """A weight whose entries all share one element (an expanded zero): the CLI's skeletons without
    a checkpoint (export, validate, combine) hold one. Not a model weight."""
    return weight.numel() > 1 and weight.dim() > 0 and all(s == 0 for s in weight.stride())


def _real_weight(base: nn.Module, what: str) -> Tensor:
    """The base weight, which `what`'s ΔW depends on; refused when it is a skeleton's placeholder."""
    weight = base_weight(base)
    if _placeholder(weight):
        raise UnsupportedModuleError(
            f"the ΔW of {what} depends on the base weight, which this command does not have; merge it "
            "into the checkpoint (adapterlab merge) or al.load it into the model instead"
        )
    return weight
