"""LoRA for Linear / HF Conv1D, and ConvLoRA for Conv1d/2d/3d in two layouts.

ΔW = s·B·A with s = α/r (or α/√r with rsLoRA); A Kaiming-uniform, B zero, so ΔW = 0 at start.
Conv layouts (`conv_mode`):
- "kernel" (PEFT's): A is a conv C_in→r with the base kernel/stride/padding/dilation/groups,
  B a 1×1 conv r→C_out with the base groups; needs r % groups == 0.
- "reshape" (loralib / DSCLoRA): A ∈ R^{(r·k0)×(C_in·k1·…)}, B ∈ R^{(C_out/groups·k0)×(r·k0)},
  ΔW = (B·A) viewed as the base kernel. For 2-D square kernels this is exactly loralib's ConvLoRA.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import quant
from ..config import AdapterConfig, check_number, register
from ..errors import ConfigError, UnsupportedModuleError
from ..kernels import lora_add
from ..layer import Delta
from ..targeting import is_conv, is_hf_conv1d, is_linear


@register
@dataclass
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation. `alpha` scales the update by alpha/r (alpha/√r when `rslora`)."""

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    conv_mode: Literal["kernel", "reshape"] = "kernel"

    def validate(self) -> None:
        super().validate()
        check_number(self, "r", low=1, integer=True, hint="use a rank such as 8 or 16")
        check_number(self, "alpha", low=0, low_open=True, hint="alpha = 2*r is a common choice")
        check_number(self, "dropout", low=0, high=0.999)
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"{self.method}: rslora={self.rslora!r} must be True or False")
        if self.conv_mode not in ("kernel", "reshape"):
            raise ConfigError(f"{self.method}: conv_mode={self.conv_mode!r}; use 'kernel' (PEFT layout) "
                              "or 'reshape' (loralib / DSCLoRA layout)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def supports(self, module: nn.Module) -> str | None:
        if is_linear(module) or is_conv(module):
            return None
        return "LoRA wraps nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d"

    def make_delta(self, module: nn.Module) -> Delta:
        if is_linear(module):
            return LinearLoRA(self, module)
        if self.conv_mode == "kernel":
            return KernelConvLoRA(self, module)
        return ReshapeConvLoRA(self, module)


@register
@dataclass
class ConvLoRAConfig(LoRAConfig):
    """ConvLoRA as in DSCLoRA: every conv by default, loralib's reshape layout."""

    method = "convlora"
    targets: str | list[str] = "all-conv"
    conv_mode: Literal["kernel", "reshape"] = "reshape"


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

    def __init__(self, config: LoRAConfig, base: nn.Module) -> None:
        super().__init__(config)
        self.transposed = is_hf_conv1d(base)
        n_in, n_out = quant.logical_shape(base)[::-1] if not self.transposed else base.weight.shape
        self.lora_A, self.lora_B = _factors((config.r, n_in), (n_out, config.r), base.weight)
        self.scaling = config.scaling
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


def _conv_nd_fn(ndim: int):
    """F.conv1d/2d/3d for a weight (or input) of 3/4/5 dimensions."""
    return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[ndim]


def _conv_apply(conv, padding_mode: str, pad: tuple[int, ...], stride, padding, dilation, groups,
                x: Tensor, weight: Tensor) -> Tensor:
    if padding_mode != "zeros":
        return conv(F.pad(x, pad, mode=padding_mode), weight, None, stride, 0, dilation, groups)
    return conv(x, weight, None, stride, padding, dilation, groups)


def conv_like(base: nn.Module):
    """`f(x, weight)`: a convolution with the base module's geometry (and padding mode), any weight."""
    return functools.partial(_conv_apply, _conv_nd_fn(base.weight.dim()), base.padding_mode,
                             base._reversed_padding_repeated_twice, base.stride, base.padding,
                             base.dilation, base.groups)


class _ConvLoRA(LowRankDelta):
    def __init__(self, config: LoRAConfig, base: nn.Module) -> None:
        super().__init__(config)
        self.conv = conv_like(base)
        self.kernel_shape = tuple(base.weight.shape)
        self.groups = base.groups
        self.scaling = config.scaling
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.peft_compatible = False


class KernelConvLoRA(_ConvLoRA):
    """A = conv C_in→r with the base geometry, B = 1×1 conv r→C_out; both grouped like the base."""

    def __init__(self, config: LoRAConfig, base: nn.Module) -> None:
        super().__init__(config, base)
        c_out, c_in_g, *k = self.kernel_shape
        g, r = self.groups, config.r
        if r % g:
            raise UnsupportedModuleError(
                f"{config.method}: rank r={r} is not divisible by the conv's groups={g}; use r a multiple "
                f"of {g} (e.g. r={g * max(1, round(r / g))}) or conv_mode='reshape'")
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

    def __init__(self, config: LoRAConfig, base: nn.Module) -> None:
        super().__init__(config, base)
        c_out, c_in_g, k0, *k_rest = self.kernel_shape
        r, g = config.r, self.groups
        c_in = c_in_g * g
        self.lora_A, self.lora_B = _factors((r * k0, c_in * math.prod(k_rest)), (c_out // g * k0, r * k0),
                                            base.weight)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight).view(self.kernel_shape) * self.scaling

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        dw = self.delta_weight()
        y = self.conv(self.drop(x.to(dw.dtype)), dw)
        return out + (y * scale).to(out.dtype)
