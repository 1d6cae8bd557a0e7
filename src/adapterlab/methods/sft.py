"""LT-SFT, composable sparse fine-tuning (Ansell et al., ACL 2022): `SFTConfig`, `train_lt_sft`
(full phase, global top-K of |θ − θ₀|, sparse phase) and the same procedure as a schedule under a
training loop you do not own (`full_steps`: `select`, then `finish`). docs/methods/sft.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, TargetSpec, check_number, config_for, register
from ..errors import ConfigError, MergeError, TargetError, UnsupportedModuleError
from ..layer import AdapterLayer, Delta
from ..model import apply_plan, deltas, plan
from ..targeting import find_targets
from .dense import DenseDelta
from .sparse import SparseDelta, check_swapped_indices, sparse_unsupported

logger = logging.getLogger("adapterlab")
LossFn = Callable[[nn.Module, Any], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@register
@dataclass
class SFTConfig(AdapterConfig):
    """LT-SFT: K = `count` entries (when set) or `density` × the targeted weights' entries."""

    method = "sft"
    summary_fields = ("density", "count", "full_steps")
    density: float | None = 0.01
    count: int | None = None
    full_steps: int | None = None  # train by schedule: this many full-phase steps, then the sparse phase

    def validate(self) -> None:
        super().validate()
        if self.count is not None:
            check_number(self, "count", low=1, integer=True, hint="K is a number of weight entries")
            self.density = None  # a count replaces the density
        elif self.density is None:
            raise ConfigError(
                f"{self.method}: set density (a fraction in (0, 1], e.g. 0.01) or count (K entries)"
            )
        else:
            check_number(
                self, "density", low=0, high=1, low_open=True, hint="use e.g. 0.01 for 1% of the entries"
            )
        if self.full_steps is not None:
            check_number(self, "full_steps", low=1, integer=True, hint="or None to train with train_lt_sft")

    def k(self, maskable: int) -> int:
        """K for targets with `maskable` entries in all; `ConfigError` if it exceeds them."""
        if self.count is None:
            assert self.density is not None  # validate(): count or density
            return max(1, round(self.density * maskable))
        if self.count > maskable:
            raise ConfigError(
                f"{self.method}: count={self.count} is larger than the {maskable} entries of the "
                f"targeted weights; use count <= {maskable} or target more modules"
            )
        return self.count

    def supports(self, module: nn.Module) -> str | None:
        return sparse_unsupported(module)

    def make_delta(self, module: nn.Module) -> Delta:
        return SparseDelta(self, module) if self.full_steps is None else PhasedDelta(self, module)

    def loaded_delta(self, module: nn.Module, built: Delta, tensors: dict[str, Tensor]) -> Delta:
        if "mask" in tensors:
            return built if isinstance(built, PhasedDelta) else PhasedDelta(self, module)
        if "weight_delta" in tensors:
            return HeadDelta(self, module)
        indices = tensors.get("indices")
        if indices is None:
            return built
        return SparseDelta(dataclasses.replace(self, full_steps=None), module, indices)

    def hotswap_values(
        self, where: str, path: str, delta: Delta, own: dict[str, Tensor], loaded: AdapterConfig
    ) -> None:
        check_swapped_indices(where, path, delta, own)  # then copied as they are, at equal shapes

    def before_step(self, model: nn.Module, name: str, step: int) -> None:
        """Sparse phase: zero the gradient outside each weight's support."""
        if self.full_steps is not None and step >= self.full_steps:
            for _, _, delta in _phased(model, name):
                if delta.weight_delta.grad is not None:
                    delta.weight_delta.grad.mul_(delta.mask)

    def after_step(self, model: nn.Module, name: str, step: int, optimizer: Any | None) -> None:
        """After the last full-phase step: select the support (`select`)."""
        if self.full_steps is not None and step == self.full_steps - 1:
            select(model, name, optimizer)

    def train_end(self, model: nn.Module, name: str, step: int) -> None:
        """A scheduled adapter past its full phase becomes plain sparse deltas (`finish`)."""
        if self.full_steps is None or not deltas(model, name, PhasedDelta):
            return
        if step >= self.full_steps:
            finish(model, name)
        else:
            logger.warning(
                "adapterlab: LT-SFT adapter %r stopped in its full phase (%d of %d steps); it stays dense",
                name,
                step,
                self.full_steps,
            )


class HeadDelta(DenseDelta):
    """A head of an SFT: trained in full and stored dense; merge keeps the head's weight so that
    unmerge restores it exactly."""

    restores_exactly = True


class PhasedDelta(DenseDelta):
    """LT-SFT trained by schedule: a dense ΔW and a `mask` of the entries that train (all of them
    in the full phase, the top-K support in the sparse phase)."""

    def __init__(self, config: SFTConfig, base: nn.Module) -> None:
        reason = sparse_unsupported(base)
        if reason:
            raise UnsupportedModuleError(f"{config.method}: {reason}; got {type(base).__name__}")
        super().__init__(config, base)
        self.register_buffer(
            "mask", torch.ones(self.weight_delta.shape, dtype=torch.bool, device=self.weight_delta.device)
        )


def _phased(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer, PhasedDelta]]:
    found = deltas(model, name, PhasedDelta)
    if not found:
        raise ConfigError(
            f"adapter {name!r} is not an LT-SFT trained by schedule; inject it with "
            "al.inject(model, 'sft', density=..., full_steps=N)"
        )
    return [(path, layer, delta) for path, layer, delta in found if isinstance(delta, PhasedDelta)]


@torch.no_grad()
def select(model: nn.Module, name: str = "default", optimizer: Any | None = None) -> dict[str, int]:
    """End the full phase of scheduled LT-SFT adapter `name`: the global top-K of |ΔW| becomes the
    mask, ΔW returns to zero (θ₀) and `optimizer`'s state for ΔW is dropped. Returns K per module."""
    found = _phased(model, name)
    config = found[0][2].config
    diffs = {path: delta.weight_delta for path, _, delta in found}
    supports = select_top_k(diffs, config.k(sum(d.numel() for d in diffs.values())))
    for path, _, delta in found:
        delta.mask.zero_()
        delta.mask.view(-1)[supports[path]] = True
        delta.weight_delta.zero_()
        if optimizer is not None:
            optimizer.state.pop(delta.weight_delta, None)
    return {path: int(s.numel()) for path, s in supports.items()}


@torch.no_grad()
def finish(model: nn.Module, name: str = "default") -> None:
    """Turn scheduled LT-SFT adapter `name` (after `select`) into plain sparse deltas: the mask's
    entries of ΔW become the values. Same output, O(k) storage; active/trainable state is kept."""
    found = _phased(model, name)
    if all(bool(delta.mask.all()) for _, _, delta in found):
        raise ConfigError(
            f"adapter {name!r} is still in its full phase ({found[0][2].config.full_steps} steps); "
            "train past full_steps (or call al.sft.select) before finish"
        )
    merged = [path for path, layer, _ in found if name in layer.merged]
    if merged:
        raise MergeError(
            f"adapter {name!r} is merged (at {merged[0]!r}); call al.unmerge(model) before finish"
        )
    config = dataclasses.replace(found[0][2].config, full_steps=None)
    for _, layer, delta in found:
        flat = delta.mask.flatten().nonzero().flatten()
        sparse = SparseDelta(config, layer.base_layer, flat)
        sparse.values.data = delta.weight_delta.detach().flatten()[flat].to(sparse.values.dtype)
        sparse.values.requires_grad_(delta.weight_delta.requires_grad)
        layer.deltas[name] = sparse


@dataclass
class LTSFTResult:
    """What `train_lt_sft` did: K, the entries it was chosen from, per-module K, the losses."""

    k: int
    maskable: int
    per_module: dict[str, int] = field(default_factory=dict)
    full_losses: list[float] = field(default_factory=list)
    sparse_losses: list[float] = field(default_factory=list)


def select_top_k(diffs: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Sorted flat indices, per tensor, of the K entries with the largest |diff| over all tensors.
    Exactly K are chosen: entries tied at the K-th largest magnitude are taken in order (tensors
    in the dict's order, then by flat position) until K are reached."""
    mags = torch.cat([d.detach().abs().flatten().float() for d in diffs.values()])
    n = mags.numel()
    if not 1 <= k <= n:
        raise ConfigError(f"K={k} entries cannot be chosen from {n}; use 1 <= K <= {n}")
    bad = next((path for path, d in diffs.items() if not torch.isfinite(d).all()), None)
    if bad is not None:
        raise ConfigError(f"the full fine-tuning phase gave NaN/Inf in {bad!r}; lower the learning rate")
    kth = mags.kthvalue(n - k + 1).values
    chosen = mags > kth
    short = k - int(chosen.sum())
    chosen[(mags == kth).nonzero().flatten()[:short]] = True
    out, start = {}, 0
    for path, d in diffs.items():
        out[path] = chosen[start : start + d.numel()].nonzero().flatten()
        start += d.numel()
    return out


def train_lt_sft(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    config: SFTConfig | None = None,
    *,
    name: str = "default",
    steps: int = 100,
    sparse_steps: int | None = None,
    heads: TargetSpec | None = None,
    make_optimizer: OptimizerFactory | None = None,
    l1: float = 0.0,
) -> LTSFTResult:
    """Train an LT-SFT adapter `name` on `model` (see the module docstring) and leave it active and
    trainable. `batches` is re-iterable (a list, a DataLoader) and cycled for `steps` optimizer
    steps in the full phase and `sparse_steps` (default: `steps`) in the sparse phase;
    `loss_fn(model, batch)` returns the loss. `heads` (module names, as in `targets`) are trained
    dense in both phases and stored dense. `make_optimizer(params)` builds each phase's fresh
    optimizer (default AdamW, lr 5e-5, weight decay 0, as the official code). `l1` adds
    l1·Σ|θ − θ₀| / N over the targeted weights, N their entries (the official normalisation).
    Token embeddings join the sparse part when targeted by name (`targets=[..., "embed_tokens"]`).
    The model stays in the mode it is in (call `model.train()` first for dropout). Everything is
    validated before training; on an error in training the weights are restored."""
    given = SFTConfig() if config is None else config_for(config)
    if not isinstance(given, SFTConfig):
        raise ConfigError(f"train_lt_sft needs an SFTConfig, got a {given.method!r} config")
    config = given
    if config.full_steps is not None:
        raise ConfigError(
            f"full_steps={config.full_steps} is for training by schedule (al.before_step/after_step, "
            "AdapterCallback); train_lt_sft takes steps= instead: drop full_steps"
        )
    if not isinstance(l1, (int, float)) or l1 < 0:
        raise ConfigError(f"l1={l1!r} must be a number >= 0 (0 turns the L1 pull toward θ₀ off)")
    for what, n in (("steps", steps), ("sparse_steps", steps if sparse_steps is None else sparse_steps)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{what}={n!r} must be an integer >= 1")
    body = plan(model, config, name)
    head_steps = _head_plan(model, config, heads, {path for path, _, _ in body})
    weights = {path: cast(nn.Parameter, module.weight) for path, module, _ in body}
    maskable = sum(w.numel() for w in weights.values())
    k = config.k(maskable)

    optimizer = make_optimizer or (lambda params: torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0))
    diffs, full_losses = _full_phase(
        model,
        weights,
        [cast(nn.Parameter, m.weight) for _, m, _ in head_steps],
        batches,
        loss_fn,
        steps,
        optimizer,
        l1 / maskable,
    )
    supports = select_top_k(diffs, k)
    for path, _, delta in body:
        delta.set_support(supports[path])
    apply_plan(model, name, body + head_steps)
    values = [delta.values for _, _, delta in body]
    params = values + [p for _, _, d in head_steps for p in d.parameters()]
    penalty = (lambda: l1 / maskable * sum(v.abs().sum() for v in values)) if l1 else None
    sparse_losses = _train(model, params, batches, loss_fn, sparse_steps or steps, optimizer, penalty)
    return LTSFTResult(
        k, maskable, {path: int(s.numel()) for path, s in supports.items()}, full_losses, sparse_losses
    )


def _head_plan(
    model: nn.Module, config: SFTConfig, heads: TargetSpec | None, body: set[str]
) -> list[tuple[str, nn.Module, Delta]]:
    if heads is None:
        return []
    found = find_targets(model, dataclasses.replace(config, targets=heads, exclude=None, layers=None))
    overlap = sorted(body & {path for path, _ in found})
    if overlap:
        raise TargetError(
            f"{overlap} are both sparse targets and heads; add them to `exclude` to train them as heads"
        )
    return [(path, module, HeadDelta(config, module)) for path, module in found]


def _full_phase(
    model: nn.Module,
    weights: dict[str, nn.Parameter],
    head_weights: list[nn.Parameter],
    batches: Iterable[Any],
    loss_fn: LossFn,
    steps: int,
    optimizer: OptimizerFactory,
    l1: float,
) -> tuple[dict[str, Tensor], list[float]]:
    """Fine-tune the targeted weights and the heads (`l1`: the per-entry L1 coefficient); return
    θ − θ₀ per weight and the losses, with θ₀ and every parameter's requires_grad restored (also
    on error)."""
    trained = list(weights.values()) + head_weights
    start = [w.detach().clone() for w in trained]
    theta0 = dict(zip(weights, start[: len(weights)], strict=True))  # the heads come after
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(False)
        for w in trained:
            w.requires_grad_(True)
        penalty = (lambda: l1 * sum((w - theta0[p]).abs().sum() for p, w in weights.items())) if l1 else None
        losses = _train(model, trained, batches, loss_fn, steps, optimizer, penalty)
        with torch.no_grad():
            diffs = {path: w.detach() - theta0[path] for path, w in weights.items()}
    finally:
        with torch.no_grad():
            for w, w0 in zip(trained, start, strict=True):
                w.copy_(w0)
                w.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
    return diffs, losses


def _cycle(batches: Iterable[Any], steps: int) -> Iterator[Any]:
    done = 0
    while done < steps:
        empty = True
        for batch in batches:
            empty = False
            yield batch
            done += 1
            if done == steps:
                return
        if empty:
            raise ConfigError(
                "batches yielded nothing; pass a non-empty list or DataLoader (an exhausted "
                "iterator cannot be re-read for the second phase)"
            )


def _train(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterable[Any],
    loss_fn: LossFn,
    steps: int,
    optimizer: OptimizerFactory,
    penalty: Callable[[], Tensor | float] | None,
) -> list[float]:
    opt = optimizer(params)
    losses = []
    for batch in _cycle(batches, steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        (loss + penalty() if penalty else loss).backward()
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    return losses
