"""SaRA, progressive sparse low-rank adaptation (Hu et al., ICLR 2025): the small-|θ| entries of
each weight train as a `SparseDelta`, with a nuclear-norm term (`nuclear_norm_loss`) and
progressive re-selection (`reselect`, `progressive_update`). docs/methods/sara.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_number, register
from ..dtensors import whole
from ..errors import AdapterNameError, ConfigError, MergeError, UnsupportedModuleError
from ..kernels.reference import scatter_dense
from ..layer import AdapterLayer, Delta, base_weight
from ..model import adapters, deltas
from .sparse import SparseDelta, check_swapped_indices, sparse_unsupported


@register
@dataclass
class SaRAConfig(AdapterConfig):
    """SaRA. The mask is |θ| < `threshold` (absolute; when set it replaces `density`) or |θ| below
    each weight's `density`-quantile of |θ|. `nuclear_weight` is λ of the nuclear-norm term,
    `nuclear_min_dim` the size a weight's both dimensions must exceed to get it, and
    `progressive_step` the step at which `progressive_update` re-selects (None: never)."""

    method = "sara"
    summary_fields = ("density", "threshold", "progressive_step")
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
            raise ConfigError(
                f"{self.method}: set density (a fraction in (0, 1], e.g. 0.1) or threshold (e.g. 2e-3)"
            )
        else:
            check_number(
                self, "density", low=0, high=1, low_open=True, hint="use e.g. 0.1 for the smallest 10%"
            )
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
        assert self.density is not None  # __post_init__: density or threshold
        k = max(1, round(self.density * mags.numel()))
        return float("inf") if k >= mags.numel() else float(mags.kthvalue(k + 1).values)

    def make_delta(self, module: nn.Module) -> Delta:
        reason = sparse_unsupported(module)
        if reason:
            raise UnsupportedModuleError(f"{self.method}: {reason}; got {type(module).__name__}")
        t = self.mask_threshold(base_weight(module))
        indices = (base_weight(module).detach().abs().flatten() < t).nonzero().flatten()
        return SaRADelta(self, module, indices, t)

    def loaded_delta(self, module: nn.Module, built: Delta, tensors: dict[str, Tensor]) -> Delta:
        """The file's support; the threshold stays the one computed from the base weights."""
        return SaRADelta(self, module, tensors.get("indices", built.indices), built.threshold)

    def hotswap_values(
        self, where: str, path: str, delta: Delta, own: dict[str, Tensor], loaded: AdapterConfig
    ) -> None:
        check_swapped_indices(where, path, delta, own)  # then copied as they are, at equal shapes

    def before_step(self, model: nn.Module, name: str, step: int) -> None:
        """Add the nuclear-norm term's gradient (one weight, drawn with a generator seeded by
        `step`, so every data-parallel rank draws the same) and zero the frozen entries' gradients."""
        found = _sara_deltas(model, name)
        loss = nuclear_norm_loss(model, name, generator=torch.Generator().manual_seed(step))
        params = [d.values for _, _, d in found]
        if loss.requires_grad:
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        for _, _, d in found:
            if d.values.grad is not None and hasattr(d, "frozen"):
                d.values.grad.masked_fill_(d.frozen, 0)

    def after_step(
        self, model: nn.Module, name: str, step: int, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Re-select at `progressive_step`; keep frozen entries at their values."""
        progressive_update(model, step, optimizer, name)


class SaRADelta(SparseDelta):
    """A `SparseDelta` with SaRA's per-weight `threshold`. With a `progressive_step`, it also has
    `frozen` (a bool per entry: frozen by `reselect`) and `held` (the frozen entries' values): the
    set and shapes of tensors never change during training, so optimizers, DDP and checkpoint
    resume see the same parameters throughout."""

    def __init__(self, config: SaRAConfig, base: nn.Module, indices: Tensor | None, threshold: float) -> None:
        super().__init__(config, base, indices)
        self.threshold = threshold
        if config.progressive_step is not None:
            self.register_buffer("frozen", torch.zeros(self.k, dtype=torch.bool, device=self.indices.device))
            self.register_buffer("held", torch.zeros_like(self.values.detach()))

    @property
    def trained(self) -> int:
        """Entries still training (k minus the frozen ones)."""
        return self.k - int(self.frozen.sum()) if hasattr(self, "frozen") else self.k

    @torch.no_grad()
    def freeze(self, keep: Tensor) -> None:
        """Freeze, at their current values, the entries where `keep` (a bool per entry) is False."""
        if not hasattr(self, "frozen"):
            raise ConfigError(
                "sara: reselect needs progressive_step set in the config (it keeps the frozen mask); "
                "inject with progressive_step=<step>"
            )
        newly = ~keep & ~self.frozen
        self.held[newly] = self.values[newly]
        self.frozen |= newly

    @torch.no_grad()
    def hold(self) -> None:
        """Write the frozen entries' values back (an optimizer step may have moved them, e.g. weight decay)."""
        if hasattr(self, "frozen"):
            self.values.data[self.frozen] = self.held[self.frozen]

    def eligible(self, min_dim: int) -> bool:
        """Whether the nuclear-norm term applies: a 2-D weight (or a stack of them: MoE experts, whose
        norms add up) with both sides longer than `min_dim`."""
        return len(self.weight_shape) in (2, 3) and min(self.weight_shape[-2:]) > min_dim


def _sara_deltas(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer, SaRADelta]]:
    found = deltas(model, name)
    if not found:
        known = sorted(adapters(model)) or "none"
        raise AdapterNameError(f"no adapter named {name!r} on this model; adapters: {known}")
    if not all(isinstance(d, SaRADelta) for _, _, d in found):
        raise ConfigError(f"adapter {name!r} is a {found[0][2].config.method!r} adapter, not SaRA")
    return [(path, layer, delta) for path, layer, delta in found if isinstance(delta, SaRADelta)]


def nuclear_norm_loss(
    model: nn.Module, name: str = "default", generator: torch.Generator | None = None
) -> Tensor:
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
    # under FSDP2 the values are a DTensor shard (the indices, a buffer, are whole): gather them, a
    # collective every rank joins (each draws the same weight); the gradient flows back to the shard
    dw = scatter_dense(delta.weight_shape, whole(delta.values), delta.indices)
    if not bool(dw.detach().any()):
        return dw.sum() * 0
    return config.nuclear_weight * torch.linalg.matrix_norm(dw, ord="nuc").sum()


@torch.no_grad()
def reselect(
    model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None
) -> dict[str, tuple[int, int]]:
    """SaRA's progressive step: mask' = mask ∧ |θ₀ + Δ| < threshold, per weight of adapter `name`.
    Entries that grew past the threshold freeze at their value (they stay in ΔW). The `values`
    parameters keep their shapes; their state in `optimizer` (if given) is dropped, so it restarts.
    Returns {module path: (trained entries before, after)}."""
    found = _sara_deltas(model, name)
    merged = [path for path, layer, _ in found if name in layer.merged]
    if merged:
        raise MergeError(
            f"adapter {name!r} is merged (at {merged[0]!r}); call al.unmerge(model) before reselect"
        )
    changes = {}
    for path, layer, delta in found:
        base = base_weight(layer.base_layer).detach().reshape(-1)
        theta = base[delta.indices.long()].to(delta.values.dtype) + delta.values.detach()
        before = delta.trained
        delta.freeze(theta.abs() < delta.threshold)
        if optimizer is not None:
            optimizer.state.pop(delta.values, None)
        changes[path] = (before, delta.trained)
    return changes


def progressive_update(
    model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None, name: str = "default"
) -> dict[str, tuple[int, int]] | None:
    """Call after every optimizer step: keeps frozen entries at their values and, at the config's
    `progressive_step`, runs `reselect` and returns its report; otherwise returns None."""
    found = _sara_deltas(model, name)
    for _, _, delta in found:
        delta.hold()
    config = found[0][2].config
    if config.progressive_step is None or step != config.progressive_step:
        return None
    return reselect(model, name, optimizer)
