"""LoRA for Linear / HF Conv1D, and ConvLoRA for Conv1d/2d/3d in two layouts; Embedding and DoRA
deltas are in lora_variants.py, PEFT's file format in lora_peft.py.

ΔW = s·B·A with s = α/r (or α/√r with rsLoRA); A Kaiming-uniform, B zero, so ΔW = 0 at start.
Conv layouts (`conv_mode`):
- "kernel" (PEFT's): A is a conv C_in→r with the base kernel/stride/padding/dilation/groups,
  B a 1×1 conv r→C_out with the base groups; needs r % groups == 0.
- "reshape" (loralib / DSCLoRA): A ∈ R^{(r·k0)×(C_in·k1·…)}, B ∈ R^{(C_out/groups·k0)×(r·k0)},
  ΔW = (B·A) viewed as the base kernel. For 2-D square kernels this is exactly loralib's ConvLoRA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import quant
from ..config import AdapterConfig, check_number, register
from ..errors import ConfigError, HotswapError, UnsupportedModuleError
from ..experts import ExpertWeights
from ..kernels import linear_lora, lora_add
from ..layer import Delta, base_weight
from ..targeting import is_conv, is_embedding, is_hf_conv1d, is_linear
from . import lora_hotswap, lora_peft
from .lora_experts import ExpertLoRA, from_peft_tensors, to_peft_tensors

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d  # what `is_conv` accepts

MAX_RANK = 2**20  # above any layer's width: a larger rank is a typo, or a file asking for terabytes
MAX_SCALING = 2.0**64  # |alpha / r|; far beyond any trained adapter, and float32 can still hold ΔW


@register
@dataclass
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation. `alpha` scales the update by alpha/r (alpha/√r when `rslora`).

    `use_dora`: DoRA (a trained magnitude per output, lora_variants.py). `rank_pattern` /
    `alpha_pattern`: {pattern: r or alpha} for the modules whose path a pattern matches as PEFT
    matches them (`(.*[.])?(pattern)$`, the first matching pattern wins); others use `r` / `alpha`.
    `modules_to_save`: module names (as in `targets`) trained and saved whole, as PEFT's."""

    method = "lora"
    peft_type = "LORA"
    summary_fields = ("r", "alpha", "rslora", "conv_mode", "dropout")
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    conv_mode: Literal["kernel", "reshape"] = "kernel"
    use_dora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        check_number(self, "r", low=1, high=MAX_RANK, integer=True, hint="use a rank such as 8 or 16")
        check_number(self, "alpha", low=0, low_open=True, hint="alpha = 2*r is a common choice")
        if not self.scaling <= MAX_SCALING:
            raise ConfigError(
                f"{self.method}: alpha={self.alpha!r} with r={self.r} scales ΔW by {self.scaling:.3g}, above "
                f"{MAX_SCALING:.3g}; ΔW would overflow. alpha = 2*r is a common choice"
            )
        check_number(self, "dropout", low=0, high=0.999)
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"{self.method}: rslora={self.rslora!r} must be True or False")
        if self.conv_mode not in ("kernel", "reshape"):
            raise ConfigError(
                f"{self.method}: conv_mode={self.conv_mode!r}; use 'kernel' (PEFT layout) "
                "or 'reshape' (loralib / DSCLoRA layout)"
            )
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"{self.method}: use_dora={self.use_dora!r} must be True or False")
        lora_peft.check_patterns(self, MAX_RANK)
        lora_peft.check_saved(self)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def rank_at(self, path: str) -> tuple[int, float]:
        """(r, scaling) of the delta at module path `path`: `rank_pattern` / `alpha_pattern` first."""
        r = lora_peft.pattern_value(self.rank_pattern, path, self.r)
        alpha = lora_peft.pattern_value(self.alpha_pattern, path, self.alpha)
        scaling = alpha / (math.sqrt(r) if self.rslora else r)
        if not scaling <= MAX_SCALING:
            raise ConfigError(
                f"{self.method}: {path!r} gets r={r}, alpha={alpha!r} from the patterns, which scales ΔW by "
                f"{scaling:.3g}, above {MAX_SCALING:.3g}; fix rank_pattern / alpha_pattern"
            )
        return r, scaling

    def supports(self, module: nn.Module) -> str | None:
        if is_linear(module) or is_conv(module) or is_embedding(module) or isinstance(module, ExpertWeights):
            return None
        return (
            "LoRA wraps nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, nn.Embedding (targeted by name) "
            "and stacked MoE expert weights"
        )

    def make_delta(self, module: nn.Module) -> Delta:
        return self._delta(module, self.r, self.scaling)

    def delta_at(self, path: str, module: nn.Module) -> Delta:
        if self.modules_to_save and any(path == n or path.endswith("." + n) for n in self.modules_to_save):
            from .lora_variants import SavedModule

            return SavedModule(self, module)
        return self._delta(module, *self.rank_at(path))

    def _delta(self, module: nn.Module, r: int, scaling: float) -> Delta:
        from . import lora_variants as v  # it subclasses this file's deltas

        if isinstance(module, ExpertWeights):
            if self.use_dora or (r, scaling) != (self.r, self.scaling):
                raise UnsupportedModuleError(
                    f"{self.method}: LoRA per MoE expert takes neither DoRA nor a rank/alpha pattern; "
                    "exclude the expert weights from use_dora / the patterns"
                )
            return ExpertLoRA(self, module)
        dora = self.use_dora
        if is_linear(module):
            return (v.DoRALinear if dora else LinearLoRA)(self, module, r, scaling)
        if is_embedding(module):
            return (v.DoRAEmbedding if dora else v.EmbeddingLoRA)(self, module, r, scaling)
        conv = cast(Conv, module)  # neither linear nor an embedding, so supports() saw a conv
        if self.conv_mode == "kernel":
            return (v.DoRAKernelConv if dora else KernelConvLoRA)(self, conv, r, scaling)
        return (v.DoRAReshapeConv if dora else ReshapeConvLoRA)(self, conv, r, scaling)

    def for_model(self, model: nn.Module) -> LoRAConfig:
        """Every rank/alpha pattern must match a targeted module (a pattern that matches none is a typo).
        With `modules_to_save`, the config names the exact paths: LoRA's and the saved modules'."""
        return lora_peft.for_model(self, model)

    # -- hot-swap ------------------------------------------------------------------------------------
    def pad_for_hotswap(self, deltas: dict[str, Delta], max_rank: int, name: str) -> None:
        """Zero-pad every factor to rank `max_rank` (ΔW unchanged); the config becomes r = max_rank
        with the α that keeps each delta's scaling (so `al.save` still writes this ΔW)."""
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < self.r:
            raise HotswapError(
                f"max_rank={max_rank!r} must be an integer >= adapter {name!r}'s rank r={self.r}; "
                f"pass the largest rank you will hot-swap in (e.g. max_rank={max(16, self.r)})"
            )
        if (
            self.use_dora
            or self.rank_pattern
            or self.alpha_pattern
            or self.modules_to_save
            or not _plain(deltas.values())
        ):
            raise HotswapError(
                f"adapter {name!r} uses DoRA, embedding LoRA, modules_to_save or a rank/alpha pattern (per-module shapes or "
                "scalings), which are not hot-swapped; al.load the other adapter instead"
            )
        if max_rank == self.r:
            return
        for path, delta in deltas.items():
            if not delta.refactorable:
                raise HotswapError(
                    f"{path!r}: a grouped kernel-layout conv LoRA (or LoRA per MoE expert) keeps its rank split, so it cannot "
                    f"be zero-padded; hot-swap adapters of its rank r={self.r} only (skip prepare_hotswap)"
                )
        scaling = next(iter(deltas.values())).scaling
        padded = dataclasses.replace(
            self, r=max_rank, alpha=scaling * (math.sqrt(max_rank) if self.rslora else max_rank)
        )
        lora_hotswap.pad_factors(list(deltas.values()), self.r, max_rank, padded)

    def hotswap_refusal(self, loaded: AdapterConfig, deltas: list[Delta]) -> str | None:
        assert isinstance(loaded, LoRAConfig)  # hotswap checked the file's method
        variant = [
            c for c in (self, loaded) if c.use_dora or c.rank_pattern or c.alpha_pattern or c.modules_to_save
        ]
        if variant or not _plain(deltas):
            return (
                "DoRA, embedding LoRA, rank/alpha patterns and modules_to_save are not hot-swapped "
                "(per-module shapes and scalings)"
            )
        if loaded.conv_mode != self.conv_mode and not all(isinstance(d, LinearLoRA) for d in deltas):
            return (
                f"the file's conv_mode={loaded.conv_mode!r} differs from the adapter's {self.conv_mode!r} "
                "(another factor layout)"
            )
        return None

    def hotswap_values(
        self, where: str, path: str, delta: Delta, own: dict[str, Tensor], loaded: AdapterConfig
    ) -> list[tuple[Tensor, Tensor]]:
        """A, B padded with zeros to the adapter's rank, B times s'/s (the loaded scaling over ours)."""
        assert isinstance(loaded, LoRAConfig)  # hotswap checked the file's method
        return lora_hotswap.factor_values(where, path, delta, own, loaded.r, loaded.scaling)

    # -- PEFT's LoraConfig -------------------------------------------------------------------------
    def to_peft(self, paths: list[str], deltas: list[Delta]) -> dict[str, Any] | None:
        return lora_peft.peft_fields(self, paths, deltas)

    def peft_refusal(self) -> str:
        why = (
            "reshape-layout conv LoRA (conv_mode='reshape')"
            if self.conv_mode == "reshape"
            else "conv LoRA with groups, dilation or a padding mode PEFT does not model"
        )
        return f"is a {why}, which PEFT cannot load"

    def file_tensors(
        self, tensors: dict[str, Tensor], modules: dict[str, dict[str, Any]]
    ) -> dict[str, Tensor]:
        """Expert-weight factors go to the file in PEFT's layout (lora_experts.py)."""
        return to_peft_tensors(tensors, modules)

    @classmethod
    def native_tensors(
        cls, tensors: dict[str, Tensor], modules: dict[str, dict[str, Any]], where: str
    ) -> dict[str, Tensor]:
        return from_peft_tensors(tensors, modules, where)

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        return lora_peft.lora_fields(data, where)

    @classmethod
    def peft_base_entry(
        cls, entry: dict[str, Any], base_shape: list[int], conv1d: bool | None
    ) -> dict[str, Any]:
        return lora_peft.base_entry(entry, base_shape, conv1d)

    @classmethod
    def peft_inferred(
        cls, tensors: dict[str, Tensor], alphas: dict[str, float], where: str
    ) -> dict[str, Any] | None:
        return lora_peft.inferred_fields(tensors, alphas, where)

    @classmethod
    def peft_modules(
        cls, data: dict[str, Any], tensors: dict[str, Tensor], where: str
    ) -> dict[str, dict[str, Any]]:
        return lora_peft.fingerprint_modules(data, tensors, where)


@register
@dataclass
class ConvLoRAConfig(LoRAConfig):
    """ConvLoRA as in DSCLoRA: every conv by default, loralib's reshape layout."""

    method = "convlora"
    targets: str | list[str] = "all-conv"
    conv_mode: Literal["kernel", "reshape"] = "reshape"


def _plain(deltas: Iterable[Delta]) -> bool:
    """Every delta a plain LoRA (no DoRA, no embedding): what hot-swapping pads and rescales."""
    return all(type(d) in (LinearLoRA, KernelConvLoRA, ReshapeConvLoRA, ExpertLoRA) for d in deltas)


class Factor(nn.Module):
    """One trainable LoRA factor, kept as `<name>.weight` so file keys read like PEFT's."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


def adapter_dtype(base: Tensor) -> torch.dtype:
    """Adapters train in fp32 (fp64 on an fp64 base), whatever the base precision."""
    return torch.float64 if base.dtype == torch.float64 else torch.float32


def _factors(a_shape: tuple[int, ...], b_shape: tuple[int, ...], like: Tensor) -> tuple[Factor, Factor]:
    dtype = adapter_dtype(like)
    a = torch.empty(a_shape, dtype=dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return Factor(a), Factor(torch.zeros(b_shape, dtype=dtype, device=like.device))


class LowRankDelta(Delta):
    """What every LoRA layout shares: ΔW, seen as a matrix, is B_m·A_m with B_m = s·B reshaped to
    (rows, inner) and A_m = A reshaped to (inner, cols). `compose` concatenates and re-factors
    in this matrix view, so it never averages A and B separately."""

    lora_A: Factor
    lora_B: Factor
    scaling: float
    refactorable = True  # False where the layout is not one product (grouped kernel-mode convs)

    def factors(self) -> tuple[Tensor, Tensor]:
        b, a = self.lora_B.weight, self.lora_A.weight
        return b.reshape(b.shape[0], -1) * self.scaling, a.reshape(a.shape[0], -1)

    def matrix(self, delta_weight: Tensor) -> Tensor:
        """A base-layout ΔW in this layout's matrix view (rows × cols)."""
        dw = delta_weight.t() if getattr(self, "transposed", False) else delta_weight
        return dw.reshape(self.lora_B.weight.shape[0], -1)

    @torch.no_grad()
    def set_factors(self, b_m: Tensor, a_m: Tensor) -> None:
        """Set B, A so that ΔW's matrix view is b_m·a_m (inner dim = this delta's A rows)."""
        self.lora_A.weight.copy_(a_m.reshape(self.lora_A.weight.shape))
        self.lora_B.weight.copy_((b_m / self.scaling).reshape(self.lora_B.weight.shape))


class LinearLoRA(LowRankDelta):
    """x ↦ s·B·A·drop(x). The base may be nn.Linear (W: out×in), HF Conv1D (W: in×out), or a
    quantized Linear (bitsandbytes, torchao: sized from its logical out×in, not the packed weight)."""

    def __init__(
        self, config: LoRAConfig, base: nn.Module, r: int | None = None, scaling: float | None = None
    ) -> None:
        super().__init__(config)
        r = config.r if r is None else r
        self.transposed = is_hf_conv1d(base)
        n_in, n_out = quant.logical_shape(base)[::-1] if not self.transposed else base_weight(base).shape
        self.lora_A, self.lora_B = _factors((r, n_in), (n_out, r), base_weight(base))
        self.scaling = config.scaling if scaling is None else scaling
        self.dropout = config.dropout
        self.peft_compatible = True

    def delta_weight(self) -> Tensor:
        dw = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return dw.t() if self.transposed else dw

    def routing_factors(self) -> tuple[Tensor, Tensor, float] | None:
        if self.training and self.dropout > 0:
            return None
        return self.lora_A.weight, self.lora_B.weight, self.scaling

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        p = self.dropout if self.training else 0.0
        return lora_add(out, x, self.lora_A.weight, self.lora_B.weight, self.scaling * scale, p)

    def forward_with_base(self, base: nn.Module, x: Tensor, scale: float) -> Tensor | None:
        p = self.dropout if self.training else 0.0
        return linear_lora(base, x, self.lora_A.weight, self.lora_B.weight, self.scaling * scale, p)


def _conv_nd_fn(ndim: int):
    """F.conv1d/2d/3d for a weight (or input) of 3/4/5 dimensions."""
    return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[ndim]


def _conv_apply(
    conv,
    padding_mode: str,
    pad: list[int],
    stride,
    padding,
    dilation,
    groups,
    x: Tensor,
    weight: Tensor,
) -> Tensor:
    if padding_mode != "zeros":
        return conv(F.pad(x, pad, mode=padding_mode), weight, None, stride, 0, dilation, groups)
    return conv(x, weight, None, stride, padding, dilation, groups)


def conv_like(base: nn.Module) -> functools.partial[Tensor]:
    """`f(x, weight)`: a convolution with the base module's geometry (and padding mode), any weight.
    `base` is an nn.Conv1d/2d/3d (`is_conv`)."""
    base = cast(Conv, base)
    return functools.partial(
        _conv_apply,
        _conv_nd_fn(base.weight.dim()),
        base.padding_mode,
        base._reversed_padding_repeated_twice,
        base.stride,
        base.padding,
        base.dilation,
        base.groups,
    )


class _ConvLoRA(LowRankDelta):
    def __init__(self, config: LoRAConfig, base: Conv, r: int | None, scaling: float | None) -> None:
        super().__init__(config)
        self.conv = conv_like(base)
        self.kernel_shape = tuple(base.weight.shape)
        self.groups = base.groups
        self.rank = config.r if r is None else r
        self.scaling = config.scaling if scaling is None else scaling
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.peft_compatible = False


class KernelConvLoRA(_ConvLoRA):
    """A = conv C_in→r with the base geometry, B = 1×1 conv r→C_out; both grouped like the base."""

    def __init__(
        self, config: LoRAConfig, base: Conv, r: int | None = None, scaling: float | None = None
    ) -> None:
        super().__init__(config, base, r, scaling)
        c_out, c_in_g, *k = self.kernel_shape
        g, r = self.groups, self.rank
        if r % g:
            raise UnsupportedModuleError(
                f"{config.method}: rank r={r} is not divisible by the conv's groups={g}; use r a multiple "
                f"of {g} (e.g. r={g * max(1, round(r / g))}) or conv_mode='reshape'"
            )
        self.lora_A, self.lora_B = _factors((r, c_in_g, *k), (c_out, r // g, *[1] * len(k)), base.weight)
        self.refactorable = g == 1
        # PEFT's A ignores groups and dilation and pads with zeros: same layout only without them
        self.peft_compatible = g == 1 and set(base.dilation) == {1} and base.padding_mode == "zeros"

    def delta_weight(self) -> Tensor:
        c_out, c_in_g, *k = self.kernel_shape
        g, r = self.groups, self.lora_A.weight.shape[0]
        a = self.lora_A.weight.reshape(g, r // g, -1)
        b = self.lora_B.weight.reshape(g, c_out // g, r // g)
        return torch.bmm(b, a).reshape(self.kernel_shape) * self.scaling

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        w_a = self.lora_A.weight
        h = self.conv(self.drop(x.to(w_a.dtype)), w_a)
        y = _conv_nd_fn(h.dim())(h, self.lora_B.weight, None, 1, 0, 1, self.groups)
        return out + (y * (self.scaling * scale)).to(out.dtype)


class ReshapeConvLoRA(_ConvLoRA):
    """loralib's layout: B·A is reshaped into the kernel, one extra conv with ΔW."""

    def __init__(
        self, config: LoRAConfig, base: Conv, r: int | None = None, scaling: float | None = None
    ) -> None:
        super().__init__(config, base, r, scaling)
        c_out, c_in_g, k0, *k_rest = self.kernel_shape
        r, g = self.rank, self.groups
        c_in = c_in_g * g
        self.lora_A, self.lora_B = _factors(
            (r * k0, c_in * math.prod(k_rest)), (c_out // g * k0, r * k0), base.weight
        )

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight).view(self.kernel_shape) * self.scaling

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        dw = self.delta_weight()
        y = self.conv(self.drop(x.to(dw.dtype)), dw)
        return out + (y * scale).to(out.dtype)
