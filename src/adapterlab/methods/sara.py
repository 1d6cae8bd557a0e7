"""SaRA: progressive sparse low-rank adaptation (Hu et al., ICLR 2025).

    al.inject(model, "sara", density=0.1)                 # or threshold=2e-3 (the official rule)
    for step, batch in enumerate(batches):
        loss = task_loss(model, batch) + sara.nuclear_norm_loss(model, generator=gen)
        loss.backward(); opt.step(); opt.zero_grad()
        sara.progressive_update(model, step, opt)          # re-selects at config.progressive_step

Per targeted weight, the entries with |θ| < threshold (the "ineffective" small ones; with
`density`, the threshold is that quantile of |θ| in each weight) train, through a `SparseDelta`:
gradients and optimizer state exist for them only.

- Low-rank constraint: `nuclear_norm_loss` is λ·‖ΔW‖_* of one random eligible weight (2-D, both
  sides longer than `nuclear_min_dim`). ΔW is built from the sparse values, so the gradient
  (U·Vᵀ) restricted to the mask reaches them. (The official code computes it on the dense
  parameter, where no optimizer reads it.)
- Progressive adjustment: `reselect` keeps training only the entries with |θ₀ + Δ| still below the
  threshold; the others freeze at their current value (they stay in ΔW as fixed entries) and the
  optimizer state of the trainable values is reset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_number, register
from ..errors import AdapterNameError, ConfigError, MergeError, UnsupportedModuleError
from ..layer import Delta
from ..model import adapter_layers, adapters
from .sparse import SparseDelta, check_indices, sparse_unsupported


@register
@dataclass
class SaRAConfig(AdapterConfig):
    """SaRA. The mask is |θ| < `threshold` (absolute; when set it replaces `density`) or |θ| below
    each weight's `density`-quantile of |θ|. `nuclear_weight` is λ of the nuclear-norm term,
    `nuclear_min_dim` the size a weight's both dimensions must exceed to get it, and
    `progressive_step` the step at which `progressive_update` re-selects (None: never)."""

    method = "sara"
    density: float | None = 0.1
    threshold: float | None = None
    nuclear_weight: float = 5e-4
    nuclear_min_dim: int = 64
    progressive_step: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.threshold is not None:
            check_number(self, "threshold", low=0, low_open=True, hint="the official default is 2e-3")
            self.density = None  # an absolute threshold replaces the density
        elif self.density is None:
            raise ConfigError(f"{self.method}: set density (a fraction in (0, 1], e.g. 0.1) or threshold (e.g. 2e-3)")
        else:
            check_number(self, "density", low=0, high=1, low_open=True, hint="use e.g. 0.1 for the smallest 10%")
        check_number(self, "nuclear_weight", low=0, hint="the paper's default is 5e-4; 0 turns the term off")
        check_number(self, "nuclear_min_dim", low=0, integer=True)
        if self.progressive_step is not None:
            check_number(self, "progressive_step", low=0, integer=True, hint="or None for no re-selection")

    def supports(self, module: nn.Module) -> str | None:
        return sparse_unsupported(module)

    def mask_threshold(self, weight: Tensor) -> float:
        """The per-weight threshold: `threshold`, or the `density`-quantile of |weight|."""
        if self.threshold is not None:
            return float(self.threshold)
        mags = weight.detach().abs().flatten().float()
        k = max(1, round(self.density * mags.numel()))
        return float("inf") if k >= mags.numel() else float(mags.kthvalue(k + 1).values)

    def make_delta(self, module: nn.Module) -> Delta:
        reason = sparse_unsupported(module)
        if reason:
            raise UnsupportedModuleError(f"{self.method}: {reason}; got {type(module).__name__}")
        t = self.mask_threshold(module.weight)
        indices = (module.weight.detach().abs().flatten() < t).nonzero().flatten()
        return SaRADelta(self, module, indices, t)

    def loaded_delta(self, module: nn.Module, built: Delta, tensors: dict[str, Tensor]) -> Delta:
        """The file's supports (re-selection may have shrunk the mask); the threshold stays the
        one computed from the base weights."""
        delta = SaRADelta(self, module, tensors.get("indices", built.indices), built.threshold)
        if "frozen_indices" in tensors:
            delta.set_frozen(tensors["frozen_indices"])
        return delta


class SaRADelta(SparseDelta):
    """A `SparseDelta` with SaRA's per-weight `threshold` and a frozen part: entries that were
    trained and then frozen by `reselect` (`frozen_indices`, `frozen_values`; in ΔW, not trained)."""

    def __init__(self, config: SaRAConfig, base: nn.Module, indices: Tensor | None, threshold: float) -> None:
        super().__init__(config, base, indices)
        self.threshold = threshold
        self.register_buffer("frozen_indices", self.indices.new_zeros(0))
        self.register_buffer("frozen_values", self.values.detach().new_zeros(0))

    def fixed_part(self) -> tuple[Tensor, Tensor] | None:
        return (self.frozen_values, self.frozen_indices) if self.frozen_indices.numel() else None

    @torch.no_grad()
    def set_frozen(self, indices: Tensor, values: Tensor | None = None) -> None:
        """Make the frozen part these flat positions (values: zeros unless given); they must not
        overlap the trained ones."""
        idx = check_indices(indices.to(self.indices.device), self.numel, "frozen_indices")
        if bool(torch.isin(idx, self.indices).any()):
            raise ConfigError("frozen_indices overlap the trained indices; an entry is either trained or frozen")
        self.frozen_indices = idx
        self.frozen_values = (self.values.new_zeros(idx.numel()) if values is None
                              else values.detach().to(self.values.dtype).clone())

    @torch.no_grad()
    def freeze(self, keep: Tensor) -> None:
        """Keep training where `keep` (a bool per trained entry) is True; the other entries move,
        with their current values, to the frozen part."""
        idx = torch.cat([self.frozen_indices, self.indices[~keep]])
        vals = torch.cat([self.frozen_values, self.values.detach()[~keep]])
        order = idx.argsort()
        self.set_support(self.indices[keep], self.values.detach()[keep])
        self.set_frozen(idx[order], vals[order])

    def eligible(self, min_dim: int) -> bool:
        """Whether the nuclear-norm term applies: a 2-D weight with both sides longer than `min_dim`."""
        return len(self.weight_shape) == 2 and min(self.weight_shape) > min_dim


def _sara_deltas(model: nn.Module, name: str) -> list[tuple[str, nn.Module, SaRADelta]]:
    found = [(path, layer, layer.deltas[name]) for path, layer in adapter_layers(model) if name in layer.deltas]
    if not found:
        known = sorted(adapters(model)) or "none"
        raise AdapterNameError(f"no adapter named {name!r} on this model; adapters: {known}")
    if not all(isinstance(d, SaRADelta) for _, _, d in found):
        raise ConfigError(f"adapter {name!r} is a {found[0][2].config.method!r} adapter, not SaRA")
    return found


def nuclear_norm_loss(model: nn.Module, name: str = "default", generator: torch.Generator | None = None) -> Tensor:
    """λ·‖ΔW‖_* for one weight of SaRA adapter `name`, drawn uniformly (with `generator`) among the
    eligible ones; add it to the loss each step. Zero (but connected to the values) when no weight
    is eligible, λ is 0 or the drawn ΔW is still zero (where the norm has no useful gradient)."""
    found = _sara_deltas(model, name)
    config = found[0][2].config
    eligible = [d for _, _, d in found if d.eligible(config.nuclear_min_dim)]
    anchor = found[0][2].values
    if not eligible or config.nuclear_weight == 0:
        return anchor.sum() * 0
    delta = eligible[int(torch.randint(len(eligible), (1,), generator=generator))]
    dw = delta.delta_weight()
    if not bool(dw.detach().any()):
        return dw.sum() * 0
    return config.nuclear_weight * torch.linalg.matrix_norm(dw, ord="nuc")


@torch.no_grad()
def reselect(model: nn.Module, name: str = "default",
             optimizer: torch.optim.Optimizer | None = None) -> dict[str, tuple[int, int]]:
    """SaRA's progressive step: mask' = mask ∧ |θ₀ + Δ| < threshold, per weight of adapter `name`.
    Entries that grew past the threshold freeze at their value. The `values` parameters stay the
    same objects; their state in `optimizer` (if given) is dropped, so it restarts for the smaller
    masks. Returns {module path: (trained entries before, after)}."""
    found = _sara_deltas(model, name)
    merged = [path for path, layer, _ in found if name in layer.merged]
    if merged:
        raise MergeError(f"adapter {name!r} is merged (at {merged[0]!r}); call al.unmerge(model) before reselect")
    changes = {}
    for path, layer, delta in found:
        base = layer.base_layer.weight.detach().reshape(-1)
        theta = base[delta.indices.long()].to(delta.values.dtype) + delta.values.detach()
        before = delta.k
        delta.freeze(theta.abs() < delta.threshold)
        if optimizer is not None:
            optimizer.state.pop(delta.values, None)
        changes[path] = (before, delta.k)
    return changes


def progressive_update(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None,
                       name: str = "default") -> dict[str, tuple[int, int]] | None:
    """Call after every optimizer step: at the config's `progressive_step`, runs `reselect` and
    returns its report; otherwise returns None."""
    config = _sara_deltas(model, name)[0][2].config
    if config.progressive_step is None or step != config.progressive_step:
        return None
    return reselect(model, name, optimizer)
