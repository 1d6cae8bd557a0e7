"""`AdapterLayer` wraps one base module and owns its named deltas; `Delta` is what every method
implements. Merge, unmerge, stacking and the forward pass are written here once, against `Delta`.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, ValuesView
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import quant, rounding
from .errors import MergeError, RoutingError

EXACT_DTYPES = (torch.float32, torch.float64)  # W + d - d returns W to well under 1e-6


def base_weight(module: nn.Module) -> Tensor:
    """`module.weight` as a tensor (torch types a module's attributes as `Tensor | Module`)."""
    return cast(Tensor, module.weight)


class Delta(nn.Module):
    """One adapter's change to one base module.

    Subclasses implement `delta_weight` (the dense ΔW, scaled, in the base weight's layout) and
    `forward(x, out, scale)` (returns `out` plus `scale` times the delta's contribution to the
    base module's output for input `x`, without building ΔW when that is cheaper).
    """

    mergeable: bool = True
    # True: AdapterLayer runs the base module once with W + scale·delta_weight() instead of adding
    # `forward`'s contribution (dense deltas: one op instead of two, same result)
    folds: bool = False
    # True: unmerge writes back the base entries saved at merge (see `support`) instead of
    # subtracting ΔW, so merge → unmerge is bit-exact
    restores_exactly: bool = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    if TYPE_CHECKING:
        # a method's own parts (lora_A, mask, ...): typed by the method, not by torch's
        # `Module.__getattr__` (which says every unknown attribute is a Tensor or a Module)
        def __getattr__(self, name: str) -> Any: ...

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def support(self) -> Tensor | None:
        """Flat indices of the only base-weight entries ΔW can change, or None for any entry. For
        a delta that `restores_exactly`, merge saves these entries (all of W for None)."""
        return None

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:  # noqa: D102
        raise NotImplementedError

    def forward_with_base(self, base: nn.Module, x: Tensor, scale: float) -> Tensor | None:
        """`base(x)` plus `scale` times this delta's contribution, computed together (e.g. one
        autograd node), or None where this delta does not do that for this base and call; the
        layer then calls the base module and `forward`. Same result as that pair."""
        return None

    def routing_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """(A, B, s) when this delta's contribution is exactly s·x·Aᵀ·Bᵀ right now, so per-sample
        routing can batch it with other adapters in one grouped op; None otherwise."""
        return None


if TYPE_CHECKING:

    class DeltaDict(nn.ModuleDict):
        """How the type checker sees `AdapterLayer.deltas`: an `nn.ModuleDict` of `Delta`s."""

        def __getitem__(self, key: str) -> Delta: ...
        def items(self) -> ItemsView[str, Delta]: ...
        def values(self) -> ValuesView[Delta]: ...
        def pop(self, key: str) -> Delta: ...

else:
    DeltaDict = nn.ModuleDict


class Routes(NamedTuple):
    """One batch's per-sample routing at one layer (set by `al.routing`): the batch size, the
    sample rows of each adapter this layer holds, and, per sample, the index into `groups` of its
    adapter (-1: none). Built once per batch, not per forward."""

    size: int
    groups: list[tuple[str, Tensor]]
    slots: Tensor

    @classmethod
    def of(cls, size: int, groups: list[tuple[str, Tensor]], device: torch.device | None = None) -> Routes:
        slots = torch.full((size,), -1, dtype=torch.long)
        for g, (_, rows) in enumerate(groups):
            slots[rows] = g
        return cls(size, groups, slots.to(device))


class AdapterLayer(nn.Module):
    """A base module plus named deltas. Attribute access falls through to the base module, so code
    that reads `layer.weight` or `layer.in_features` keeps working."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = DeltaDict()
        self.active: dict[str, float] = {}  # adapter name -> weight, in the order they apply
        self.merged: dict[str, float] = {}  # adapter name -> weight it was merged with
        self.disabled = False
        self.routes: Routes | None = None  # per-sample adapters of the current batch (al.routing)
        self._packed: tuple[Any, ...] | None = (
            None  # quantized bases: the pre-merge packed weight (quant.stash)
        )
        self.merge_error: float | None = None  # quantized bases: max rounding error of the last merge
        self._merge_change = 0.0  # ... and the largest entry of the Σ w·ΔW it merged
        # per merge call: its weights and what undoes it exactly: (flat positions, entries) saved
        # (the supports of deltas that restore exactly, or all of W), or, for fp16/bf16, the
        # rounding record (rounding.py) of what subtracting Σ w·ΔW and rounding does not give back
        self._merges: list[
            tuple[dict[str, float], list[tuple[Tensor | None, Tensor]] | rounding.RoundingRecord]
        ] = []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if (
            len(self.active) == 1
            and not (self.merged or self.disabled or args or kwargs)
            and self.routes is None
        ):
            for name, w in self.active.items():  # the one active adapter, unmerged
                fused = self.deltas[name].forward_with_base(self.base_layer, x, w)
                if fused is not None:
                    return fused
        if (
            not self.disabled
            and self.routes is None
            and any(self.deltas[n].folds for n in self.active if n not in self.merged)
        ):
            return self._forward_folded(x, *args, **kwargs)
        out: Tensor = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.routes is not None:
            return self._routed(x, out)
        for name, w in self.active.items():
            if name not in self.merged:
                out = self.deltas[name](x, out, w)
        return out

    def _forward_folded(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Deltas with `folds` go into one call of the base module with W + Σ w·ΔW (computed in
        fp32, cast to the base dtype); the others add their contribution after."""
        pending = {n: w for n, w in self.active.items() if n not in self.merged}
        base = base_weight(self.base_layer)
        weight = base.to(torch.promote_types(base.dtype, torch.float32))
        for name, w in pending.items():
            if self.deltas[name].folds:
                weight = weight + w * self.deltas[name].delta_weight()
        out: Tensor = functional_call(self.base_layer, {"weight": weight.to(base.dtype)}, (x, *args), kwargs)
        for name, w in pending.items():
            if not self.deltas[name].folds:
                out = self.deltas[name](x, out, w)
        return out

    def _routed(self, x: Tensor, out: Tensor) -> Tensor:
        """Per-sample adapters: each adapter's rows of the batch get its delta, others none."""
        size, routes, slots = self.routes  # type: ignore[misc]
        if x.shape[0] != size:
            raise RoutingError(
                f"routing ids have length {size} but the batch has {x.shape[0]} samples "
                "(dim 0); pass one adapter name or None per sample"
            )
        factors = [self.deltas[name].routing_factors() for name, _ in routes]
        lowrank = [f for f in factors if f is not None]
        if routes and len(lowrank) == len(factors):  # all plain low-rank products: one op for the batch
            from . import kernels

            return kernels.routed_lora_add(
                out,
                x,
                slots,
                [a for a, _, _ in lowrank],
                [b for _, b, _ in lowrank],
                [s for *_, s in lowrank],
            )
        for name, rows in routes:
            rows = rows.to(x.device)
            # `out` is this layer's fresh output and no op saves it, so rows are written in place
            out.index_copy_(0, rows, self.deltas[name](x.index_select(0, rows), out.index_select(0, rows)))
        return out

    # -- merge ----------------------------------------------------------------------------------
    def merged_weight(self, weights: dict[str, float]) -> Tensor:
        """W + Σ w·ΔW, computed in fp32 (or fp64) and cast to the base dtype; nothing is written.
        A quantized base gives its dequantized W, and the sum stays fp32."""
        if quant.is_quantized(self.base_layer):
            base, acc = None, quant.dequantized_weight(self.base_layer)
        else:
            base = base_weight(self.base_layer)
            acc = base.detach().to(torch.promote_types(base.dtype, torch.float32))
        for name, w in weights.items():
            delta = self.deltas[name]
            if not delta.mergeable:
                raise MergeError(f"adapter {name!r} ({type(delta).__name__}) cannot be merged into weights")
            acc = acc + w * delta.delta_weight().detach().to(acc.dtype)
        return acc if base is None else acc.to(base.dtype)

    def records_rounding(self, weights: dict[str, float]) -> bool:
        """Whether merging `weights` keeps a rounding record (an fp16/bf16 weight, no ΔW that reads
        W): then `merge(weights, finite=True)` checks for NaN/Inf as it merges, and
        `undo_last_merge` puts the weight back bit for bit."""
        if not weights or quant.is_quantized(self.base_layer):
            return False
        reads_w = any(self.deltas[n].restores_exactly and self.deltas[n].support() is None for n in weights)
        return base_weight(self.base_layer).dtype not in EXACT_DTYPES and not reads_w

    @torch.no_grad()
    def merge(self, weights: dict[str, float], finite: bool = False) -> None:
        """W ← W + Σ w·ΔW. `finite`: for a merge that `records_rounding`, refuse (MergeError, the
        weight unchanged) when the merged weight has NaN/Inf; other merges do not check."""
        twice = [n for n in weights if n in self.merged]
        if twice:
            raise MergeError(f"adapter(s) {twice} are merged already; call unmerge first")
        if quant.is_quantized(self.base_layer):
            self._merge_quantized(weights)
            return
        base = base_weight(self.base_layer)
        if self.records_rounding(weights):  # fp16/bf16: in place, chunk by chunk, ΔW computed once
            self._check_mergeable(weights)
            changes = [  # summed in merged_weight's order (same bits)
                (w * self.deltas[n].delta_weight().detach().to(torch.float32)).reshape(-1)
                for n, w in weights.items()
            ]
            with _flat(base) as flat:
                record = rounding.merge_(flat, changes)
                if finite and not record.finite:
                    rounding.unmerge_(flat, sum(changes, torch.zeros_like(changes[0])), record)
                    raise MergeError(self.not_finite(weights))
            self._merges.append((dict(weights), record))
            self.merged.update(weights)
            return
        new = self.merged_weight(weights)
        flat, saved = base.detach().reshape(-1), []
        if base.dtype in EXACT_DTYPES:
            for name in weights:
                if self.deltas[name].restores_exactly:
                    where = self.deltas[name].support()
                    saved.append((where, flat.clone() if where is None else flat[where.long()]))
        else:
            saved.append((None, flat.clone()))  # ΔW reads W (DoRA): subtracting it later cannot undo
        self._merges.append((dict(weights), saved))
        base.copy_(new)
        self.merged.update(weights)

    def merge_record_bytes(self) -> int:
        """Bytes this layer keeps to undo its merges exactly (0 when unmerge only subtracts)."""
        total = 0
        for _, saved in self._merges:
            if isinstance(saved, rounding.RoundingRecord):
                total += saved.nbytes()
            else:
                total += sum(
                    e.numel() * e.element_size() + (0 if w is None else w.numel() * w.element_size())
                    for w, e in saved
                )
        return total

    def _check_mergeable(self, weights: dict[str, float]) -> None:
        for name in weights:
            if not self.deltas[name].mergeable:
                raise MergeError(
                    f"adapter {name!r} ({type(self.deltas[name]).__name__}) cannot be merged into weights"
                )

    def _delta_sum(self, weights: dict[str, float]) -> Tensor:
        """Σ w·ΔW in fp32 (fp64 for fp64 weights): what unmerge subtracts from an fp16/bf16 weight."""
        base = base_weight(self.base_layer)
        acc = torch.zeros(
            base.shape, dtype=torch.promote_types(base.dtype, torch.float32), device=base.device
        )
        for name, w in weights.items():
            acc += w * self.deltas[name].delta_weight().detach().to(acc.dtype)
        return acc

    @staticmethod
    def not_finite(weights: dict[str, float]) -> str:
        """The message of a merge refused for NaN/Inf."""
        return (
            f"merging {sorted(weights)} gives NaN/Inf; nothing was merged. "
            "Check the adapter weights (al.save and inspect them) or pass safe=False"
        )

    @torch.no_grad()
    def undo_last_merge(self) -> None:
        """Undo the latest merge call, bit for bit; only for one that `records_rounding`."""
        weights, saved = self._merges[-1]
        if not isinstance(saved, rounding.RoundingRecord):
            raise MergeError("only a merge that keeps a rounding record (fp16/bf16) can be undone alone")
        with _flat(base_weight(self.base_layer)) as flat:
            rounding.unmerge_(flat, self._delta_sum(weights).view(-1), saved)
        self._merges.pop()
        for name in weights:
            del self.merged[name]

    def _merge_quantized(self, weights: dict[str, float]) -> None:
        """Dequantize, add Σ w·ΔW in fp32, requantize into new storage; the first merge keeps the
        original packed weight aside, so unmerge puts it back bit for bit. `merge_error` is the
        rounding error: max |requantized − (W + Σ w·ΔW)|, i.e. how far the merged change is off."""
        saved = self._packed or quant.stash(self.base_layer)
        before, new = quant.dequantized_weight(self.base_layer), self.merged_weight(weights)
        self._merge_change = float((new - before).abs().max()) if new.numel() else 0.0
        self.merge_error = quant.requantize(self.base_layer, new)
        self._packed = saved
        self.merged.update(weights)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        base = base_weight(self.base_layer)
        if self._packed is not None:
            quant.restore(self.base_layer, self._packed)
            self._packed = self.merge_error = None
        elif base.dtype not in EXACT_DTYPES:  # undo merge calls last-first
            with _flat(base) as flat:
                for weights, saved in reversed(self._merges):
                    if isinstance(saved, rounding.RoundingRecord):
                        rounding.unmerge_(flat, self._delta_sum(weights).view(-1), saved)
                    else:
                        flat.copy_(saved[0][1])
        else:  # undo merge calls last-first: subtract ΔW, or write back the entries saved for it
            acc = base.detach().clone(memory_format=torch.contiguous_format)
            flat = acc.view(-1)
            for weights, saved in reversed(self._merges):
                assert not isinstance(saved, rounding.RoundingRecord)  # only fp16/bf16 keep those
                for name, w in weights.items():
                    if not self.deltas[name].restores_exactly:
                        acc -= w * self.deltas[name].delta_weight().detach().to(acc.dtype)
                for where, entries in saved:
                    if where is None:
                        flat.copy_(entries)
                    else:
                        flat[where.long()] = entries
            base.copy_(acc)
        self._merges.clear()
        self.merged.clear()


def merge_all(layers: list[tuple[str, AdapterLayer, dict[str, float]]], safe: bool) -> None:
    """Merge each (path, layer, weights). `safe`: refuse NaN/Inf with every weight left as it was.
    fp16/bf16 layers go first and check as they merge (each ΔW computed once); on a refusal the
    ones merged so far are undone bit for bit. The others are checked before anything is written."""
    layers = sorted(layers, key=lambda entry: not entry[1].records_rounding(entry[2]))
    if safe:
        for path, layer, weights in layers:
            if not layer.records_rounding(weights) and not torch.isfinite(layer.merged_weight(weights)).all():
                raise MergeError(f"at {path!r}: {AdapterLayer.not_finite(weights)}")
    done: list[AdapterLayer] = []
    for path, layer, weights in layers:
        try:
            layer.merge(weights, finite=safe)
        except Exception as err:
            for prior in reversed(done):
                prior.undo_last_merge()
            if isinstance(err, MergeError):
                raise MergeError(f"at {path!r}: {err}") from None
            raise
        if layer.records_rounding(weights):
            done.append(layer)


@contextmanager
def _flat(weight: Tensor) -> Iterator[Tensor]:
    """`weight` as a flat tensor to change in place (a contiguous copy, written back, if it is not
    contiguous)."""
    data = weight.detach()
    if data.is_contiguous():
        yield data.view(-1)
    else:
        flat = data.contiguous().view(-1)
        yield flat
        data.copy_(flat.view(data.shape))
