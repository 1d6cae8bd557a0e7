"""`DenseDelta`: a trainable ΔW of the base weight's full shape, zero at start (HFT, LocFT).

The layer's output with the delta is the base module run with W + s·ΔW. For every supported
module that output is linear in W, so it equals base(x) + s·f(x; ΔW) where f is the module's op
with ΔW as its only weight (no bias):

- nn.Linear:          f = x·ΔWᵀ
- transformers Conv1D: f = x·ΔW                (weight stored in × out)
- nn.Conv1d/2d/3d:    f = conv(x, ΔW) with the base geometry
- nn.Embedding:       f = ΔW[x]                (a row lookup; targeted by name only, no max_norm)
- nn.LayerNorm:       f = Δγ ⊙ (x − μ)/σ        (F.layer_norm with weight Δγ and no bias)
- RMSNorm (torch, Llama, Mistral, Qwen2, T5's T5LayerNorm, …): f = Δγ ⊙ x/rms(x): the module's own forward with
  γ replaced by Δγ. Only norms whose output is γ ⊙ n(x) qualify; a probe at construction checks
  that γ = 0 gives 0 (Gemma's (1 + γ) ⊙ n(x) does not, and is refused).

`AdapterLayer` folds dense deltas into one call of the base module (`Delta.folds`): the forward
and backward then cost what full fine-tuning of that module costs, with no second matmul.
`forward(x, out, scale)` is the additive form above, for callers that apply deltas one by one.
Biases are not part of the delta; they stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .. import quant
from ..config import AdapterConfig, register
from ..errors import UnsupportedModuleError
from ..experts import ExpertWeights
from ..layer import Delta, base_weight
from ..targeting import is_conv, is_embedding, is_hf_conv1d
from .lora import adapter_dtype, conv_like


def is_rms_norm(module: nn.Module) -> bool:
    """torch's nn.RMSNorm, a `*RMSNorm` class with a 1-D `weight`, or a scale-only `*LayerNorm`
    class that is not nn.LayerNorm: 1-D `weight`, no `bias` (T5LayerNorm, MT5's, LongT5's,
    Pix2Struct's: RMS norms under another name). `DenseDelta` probes that the output is γ ⊙ n(x)."""
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    weight, name = getattr(module, "weight", None), type(module).__name__
    if not (isinstance(weight, Tensor) and weight.dim() == 1) or isinstance(module, nn.LayerNorm):
        return False
    return name.endswith("RMSNorm") or (name.endswith("LayerNorm") and getattr(module, "bias", None) is None)


def is_router(module: nn.Module) -> bool:
    """A transformers MoE router (`*TopKRouter`): a module whose 2-D `weight` (E, hidden) scores
    the experts; a dense delta folds into that weight (the routing after it is not linear)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.lower().endswith("router")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
    )


def dense_kind(module: nn.Module) -> str | None:
    """The module's kind for `DenseDelta` ("linear", "hf_conv1d", "conv", "embedding", "layer_norm", "rms_norm"),
    or None if it has no dense-delta form."""
    if isinstance(module, ExpertWeights):
        return "experts"  # a stacked MoE weight: ΔW is added to the weight the experts read
    if is_router(module):
        return "router"
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "hf_conv1d"
    if is_conv(module):
        return "conv"
    if is_embedding(module):
        return "embedding" if getattr(module, "max_norm", None) is None else None
    if isinstance(module, nn.LayerNorm):
        return "layer_norm" if module.weight is not None else None
    if is_rms_norm(module):
        return "rms_norm" if getattr(module, "weight", None) is not None else None
    return None


def dense_unsupported(module: nn.Module) -> str | None:
    """None if `DenseDelta` can wrap `module`, else why not (for `AdapterConfig.supports`)."""
    if quant.is_quantized(module):
        return quant.entrywise_refusal(module)
    if dense_kind(module) is None:
        return (
            "a dense delta wraps nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, nn.Embedding without max_norm, "
            "nn.LayerNorm with a weight, RMSNorm layers, MoE routers and stacked MoE expert weights"
        )
    return None


class DenseDelta(Delta):
    """ΔW of the base weight's shape, trained directly; `delta_weight()` is ΔW itself."""

    folds = True

    def __init__(self, config: AdapterConfig, base: nn.Module) -> None:
        super().__init__(config)
        kind = dense_kind(base)
        if kind is None:
            raise UnsupportedModuleError(
                f"{config.method}: {dense_unsupported(base)}; got {type(base).__name__}"
            )
        self.kind = kind
        weight = base_weight(base)
        self.weight_delta = nn.Parameter(
            torch.zeros(weight.shape, dtype=adapter_dtype(weight), device=weight.device)
        )
        if kind == "conv":
            self._conv = conv_like(base)
        elif kind == "layer_norm":
            norm = cast(nn.LayerNorm, base)
            self._shape, self._eps = tuple(norm.normalized_shape), norm.eps
        elif kind == "rms_norm":
            # a plain reference (not a child module): the delta's state_dict holds only ΔW, and a
            # deepcopy of the model maps it onto the copied base module
            object.__setattr__(self, "_norm", base)
            _check_linear_in_gamma(config, base)

    def delta_weight(self) -> Tensor:
        return self.weight_delta

    def contribution(self, x: Tensor) -> Tensor:
        """f(x; ΔW): the base module's op with ΔW as its only weight."""
        w = self.weight_delta
        if self.kind == "experts":  # the "input" of a weight is ignored: its output is the weight
            return w
        if self.kind == "router":
            raise UnsupportedModuleError(
                f"{self.config.method}: a router's delta only folds into its weight (top-k routing is not "
                "additive), so it cannot run per sample; route adapters that do not change routers"
            )
        if self.kind == "linear":
            return F.linear(x.to(w.dtype), w)
        if self.kind == "hf_conv1d":
            return x.to(w.dtype) @ w
        if self.kind == "conv":
            return self._conv(x.to(w.dtype), w)
        if self.kind == "embedding":
            return F.embedding(x, w)
        if self.kind == "layer_norm":
            return F.layer_norm(x.to(w.dtype), self._shape, w, None, self._eps)
        return functional_call(self._norm, {"weight": w}, (x.to(w.dtype),))

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        return out + (self.contribution(x) * scale).to(out.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, shape={tuple(self.weight_delta.shape)}, dtype={self.weight_delta.dtype}"


@torch.no_grad()
def _check_linear_in_gamma(config: AdapterConfig, norm: nn.Module) -> None:
    weight = base_weight(norm)
    probe = torch.randn(2, weight.shape[0], dtype=weight.dtype, device=weight.device)
    if functional_call(norm, {"weight": torch.zeros_like(weight)}, (probe,)).abs().max() != 0:
        raise UnsupportedModuleError(
            f"{config.method}: {type(norm).__name__} is not of the form γ ⊙ n(x) (with γ = 0 its output is not 0, "
            "as in Gemma's (1 + γ) ⊙ n(x)), so a dense delta on its weight has no additive form; exclude it"
        )


@register
@dataclass
class DenseConfig(AdapterConfig):
    """A full-shape ΔW on every target: what `al.combine(..., kind="dense")` produces, and plain
    fine-tuning of chosen modules kept as a detachable delta."""

    method = "dense"

    def supports(self, module: nn.Module) -> str | None:
        return dense_unsupported(module)

    def make_delta(self, module: nn.Module) -> Delta:
        return DenseDelta(self, module)
