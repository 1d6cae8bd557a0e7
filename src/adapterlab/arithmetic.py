"""Task arithmetic, TIES, DARE and magnitude pruning as pure functions over ΔW tensors: used by
`al.combine`, `adapterlab combine CONFIG.yaml` and the streaming `adapterlab merge` alike.
The formulas: docs/compose.md.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import ConfigError
from .text import excerpt

TENSOR_HOWS = (
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
)  # one ΔW per input in, one out


def kept_count(density: float, n: int) -> int:
    """How many of `n` entries a trim at `density` keeps: ⌊density·n⌋, as peft's `merge_utils` and
    mergekit count, so the same inputs give the same tensor in each tool."""
    return int(density * n)


def trim(tau: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """Keep the `density` fraction of entries with the largest |τ| (exactly ⌊density·n⌋ of them),
    or, given a `threshold`, every entry with |τ| ≥ threshold."""
    if threshold is not None:
        return tau * (tau.abs() >= threshold)
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().flatten().topk(kept_count(density, tau.numel())).indices] = True
    return tau * keep.view(tau.shape)


def disjoint_mean(taus: list[Tensor], weights: list[float] | None = None) -> Tensor:
    """TIES: elect the sign of Σ τᵢ per entry (0 counts as +, as in peft), then average wᵢ·τᵢ over
    the inputs whose entry has that sign (divided by their count, not by their weights)."""
    stacked = torch.stack(taus)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == majority
    if weights is not None:
        stacked = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(
            -1, *[1] * (stacked.dim() - 1)
        )
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Drop each entry with probability `p`, rescale the rest by 1/(1 − p)."""
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= p
    return tau * keep / (1.0 - p)


def check_density_p(density: float, p: float) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ConfigError(
            f"density={excerpt(density)} must be in (0, 1]; e.g. 0.2 keeps the top 20% of each task vector"
        )
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise ConfigError(f"p={excerpt(p)} is the DARE drop probability; it must be in [0, 1), e.g. 0.9")


def global_threshold(taus: list[Tensor], density: float) -> float:
    """The |τ| of the ⌊density·n⌋-th largest entry over all of one input's targets (∞ if that is
    none: nothing is kept)."""
    flat = torch.cat([t.detach().float().abs().flatten() for t in taus])
    k = kept_count(density, flat.numel())
    return flat.topk(k).values[-1].item() if k else math.inf


def combine_tensors(
    taus: dict[str, Tensor],
    weights: dict[str, float],
    how: str,
    *,
    density: float = 0.2,
    p: float = 0.9,
    generator: torch.Generator | None = None,
    thresholds: dict[str, float] | None = None,
) -> Tensor:
    """Σ over inputs of `weights[n]`·τₙ by `how` (one of `TENSOR_HOWS`; "svd" combines as
    "linear"), in fp32. DARE draws its masks from `generator`, input by input in the order of
    `weights`; `thresholds` (per input) replace `density` for a global trim."""
    if not weights:
        raise ConfigError("weights is empty; pass {input name: weight} for at least one input")
    taus = {n: taus[n].detach().float() for n in weights}
    if how in ("linear", "svd"):
        return _sum(w * taus[n] for n, w in weights.items())
    if how in ("dare_linear", "dare_ties"):
        if generator is None:
            raise ConfigError(f"how={how!r} draws random masks; pass a generator")
        dropped = [dare(taus[n], p, generator) for n in weights]
        if how == "dare_linear":
            return _sum(w * d for w, d in zip(weights.values(), dropped, strict=True))
        return disjoint_mean(dropped, list(weights.values()))
    if how not in TENSOR_HOWS:
        raise ConfigError(f"how={how!r} does not combine ΔW tensors; choose one of {', '.join(TENSOR_HOWS)}")
    trimmed = [trim(taus[n], density, thresholds[n] if thresholds else None) for n in weights]
    if how == "magnitude_prune":
        return _sum(w * t for w, t in zip(weights.values(), trimmed, strict=True))
    return disjoint_mean(trimmed, list(weights.values()))


def _sum(terms: Iterable[Tensor]) -> Tensor:
    """Σ terms left to right, as `sum` adds them (there is at least one)."""
    return functools.reduce(operator.add, terms)
