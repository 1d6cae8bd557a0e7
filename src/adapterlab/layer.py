"""`AdapterLayer` wraps one base module and owns its named deltas; `Delta` is what every method
implements. Merge, unmerge, stacking and the forward pass are written here once, against `Delta`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import MergeError, RoutingError

EXACT_DTYPES = (torch.float32, torch.float64)  # W + d - d returns W to well under 1e-6


class Delta(nn.Module):
    """One adapter's change to one base module.

    Subclasses implement `delta_weight` (the dense ΔW, scaled, in the base weight's layout) and
    `forward(x, out, scale)` (returns `out` plus `scale` times the delta's contribution to the
    base module's output for input `x`, without building ΔW when that is cheaper).
    """

    mergeable: bool = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:  # noqa: D102
        raise NotImplementedError


class AdapterLayer(nn.Module):
    """A base module plus named deltas. Attribute access falls through to the base module, so code
    that reads `layer.weight` or `layer.in_features` keeps working."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.active: dict[str, float] = {}   # adapter name -> weight, in the order they apply
        self.merged: dict[str, float] = {}   # adapter name -> weight it was merged with
        self.disabled = False
        self.routes: tuple[int, list[tuple[str, Tensor]]] | None = None  # (batch size, [(name, rows)])
        self._original: Tensor | None = None  # pre-merge weight, kept only for inexact dtypes

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.routes is not None:
            return self._routed(x, out)
        for name, w in self.active.items():
            if name not in self.merged:
                out = self.deltas[name](x, out, w)
        return out

    def _routed(self, x: Tensor, out: Tensor) -> Tensor:
        """Per-sample adapters: each adapter's rows of the batch get its delta, others none."""
        size, routes = self.routes  # type: ignore[misc]
        if x.shape[0] != size:
            raise RoutingError(f"routing ids have length {size} but the batch has {x.shape[0]} samples "
                               "(dim 0); pass one adapter name or None per sample")
        for name, rows in routes:
            rows = rows.to(x.device)
            # `out` is this layer's fresh output and no op saves it, so rows are written in place
            out.index_copy_(0, rows, self.deltas[name](x.index_select(0, rows), out.index_select(0, rows)))
        return out

    # -- merge ----------------------------------------------------------------------------------
    def merged_weight(self, weights: dict[str, float]) -> Tensor:
        """W + Σ w·ΔW, computed in fp32 (or fp64) and cast to the base dtype; nothing is written."""
        base = self.base_layer.weight
        acc = base.detach().to(torch.promote_types(base.dtype, torch.float32))
        for name, w in weights.items():
            delta = self.deltas[name]
            if not delta.mergeable:
                raise MergeError(f"adapter {name!r} ({type(delta).__name__}) cannot be merged into weights")
            acc = acc + w * delta.delta_weight().detach().to(acc.dtype)
        return acc.to(base.dtype)

    @torch.no_grad()
    def merge(self, weights: dict[str, float]) -> None:
        twice = [n for n in weights if n in self.merged]
        if twice:
            raise MergeError(f"adapter(s) {twice} are merged already; call unmerge first")
        base = self.base_layer.weight
        new = self.merged_weight(weights)
        if base.dtype not in EXACT_DTYPES and self._original is None:
            self._original = base.detach().clone()
        base.copy_(new)
        self.merged.update(weights)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.base_layer.weight
        if self._original is not None:
            base.copy_(self._original)
            self._original = None
        else:
            negated = {n: -w for n, w in self.merged.items()}
            acc = base.detach().clone()
            for name, w in negated.items():
                acc += w * self.deltas[name].delta_weight().detach().to(acc.dtype)
            base.copy_(acc)
        self.merged.clear()
