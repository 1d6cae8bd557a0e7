"""The model-level API: inject, activate, disable, merge, unload, delete, summarise.

The model is changed in place and returned (no outer wrapper, so state-dict keys stay the model's
own, with `.base_layer.` and `.deltas.<name>.` inserted at adapted modules).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import quant, running_stats
from .config import AdapterConfig, config_for
from .errors import AdapterNameError, ConfigError, MergeError, TargetError
from .experts import ExpertWeights, attach, detach
from .layer import AdapterLayer, Delta, Routes, merge_all
from .sharing import install, require_unshared, shared_targets
from .targeting import find_targets

Plan = list[tuple[str, nn.Module, Delta]]
_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_FLAGS = "_adapterlab_requires_grad"  # the base parameters' requires_grad before the first inject


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers, whose module paths would start with "module."."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def deltas(
    model: nn.Module, name: str, kind: type | tuple[type, ...] | None = None
) -> list[tuple[str, AdapterLayer, Delta]]:
    """(path, layer, delta) of every module adapter `name` changes, in model order; with `kind`,
    only deltas of that class."""
    return [
        (path, layer, layer.deltas[name])
        for path, layer in adapter_layers(model)
        if name in layer.deltas and (kind is None or isinstance(layer.deltas[name], kind))
    ]


def adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """{adapter name: config} for every adapter on the model, in the order they were added."""
    found: dict[str, AdapterConfig] = {}
    for _, layer in adapter_layers(model):
        for name, delta in layer.deltas.items():
            found.setdefault(name, delta.config)
    return found


def active(model: nn.Module) -> dict[str, float]:
    """{adapter name: weight} of the adapters that apply in the forward pass."""
    found: dict[str, float] = {}
    for _, layer in adapter_layers(model):
        for name, w in layer.active.items():
            found.setdefault(name, w)
    return found


def _require(model: nn.Module, names: str | Iterable[str]) -> list[str]:
    known = adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in known]
    if missing:
        raise AdapterNameError(
            f"no adapter named {missing} on this model; adapters: {sorted(known) or 'none'}"
        )
    return names


def plan(
    model: nn.Module,
    config: AdapterConfig,
    name: str,
    paths: list[str] | None = None,
    build: Callable[[str, nn.Module], Delta] | None = None,
) -> Plan:
    """Validate and build every delta `inject` would add, without touching the model.
    `paths` (exact module paths) replaces the config's targeting, and `build(path, module)` the
    config's `make_delta`, as when loading a file."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterNameError(
            f"adapter name {name!r} is invalid; use letters, digits, '_' or '-' (e.g. 'default')"
        )
    if name in adapters(model):
        raise AdapterNameError(
            f"an adapter named {name!r} exists already; choose another name or al.delete it first"
        )
    if paths is not None:
        exact = "|".join(re.escape(p) for p in paths)
        targets = find_targets(
            model, dataclasses.replace(config, targets=f"(?:{exact})", exclude=None, layers=None)
        )
    else:
        targets = find_targets(model, config)
    if any(path == "" for path, _ in targets):
        raise TargetError("the model itself is a target; wrap it in a container, e.g. nn.Sequential(module)")
    targets = shared_targets(model, targets, exact=paths is not None)  # a reused module: all its places
    return [
        (path, module, build(path, module) if build else config.delta_at(path, module))
        for path, module in targets
    ]


def apply_plan(
    model: nn.Module, name: str, steps: Plan, *, trainable: bool = True, activate: bool = True
) -> None:
    """Wrap the planned modules and add the deltas (active unless `activate=False`); freeze
    everything but the new adapter (and that too unless `trainable`)."""
    if not hasattr(model, _FLAGS):
        object.__setattr__(model, _FLAGS, {n: p.requires_grad for n, p in model.named_parameters()})
    running_stats.remember(model, name)  # what this adapter's training moves is saved with it
    if hasattr(type(model), "save_pretrained") and "save_pretrained" not in model.__dict__:
        from .io import save_pretrained  # a Hugging Face model: its own method would save wrapper keys

        object.__setattr__(model, "save_pretrained", types.MethodType(save_pretrained, model))
    for path, module, delta in steps:
        parent_path, _, leaf = path.rpartition(".")
        current = model.get_submodule(parent_path)._modules.get(leaf)  # None: an expert weight, unwrapped
        if not isinstance(current, AdapterLayer):
            current = AdapterLayer(module)
            if isinstance(module, ExpertWeights):  # a parameter's place: one path only
                attach(model.get_submodule(parent_path), leaf)
                setattr(model.get_submodule(parent_path), leaf, current)
            else:
                install(model, path, current)  # at every path the module is registered at
        delta.train(current.base_layer.training)
        current.deltas[name] = delta
        if activate:
            current.active[name] = 1.0
    for p in model.parameters():
        p.requires_grad_(False)
    for _, _, delta in steps:
        delta.requires_grad_(trainable)


def inject(
    model: nn.Module, method: str | AdapterConfig = "lora", name: str = "default", **options: Any
) -> nn.Module:
    """Add adapter `name` of `method` to the targeted modules of `model`; return `model`.

    `method` is a registered name ("lora", "convlora", …) with its options as keyword arguments,
    or a config object. Atomic: everything is validated and built before the model changes.
    The new adapter joins the active set and is the only trainable part of the model.
    """
    config = config_for(method, **options).for_model(model)
    apply_plan(model, name, plan(model, config, name))
    return model


def set_active(model: nn.Module, names: str | list[str] | dict[str, float]) -> None:
    """Choose which adapters apply, and with what weight; several stack (their deltas add)."""
    weights = (
        dict(names)
        if isinstance(names, dict)
        else {n: 1.0 for n in ([names] if isinstance(names, str) else names)}
    )
    _require(model, list(weights))
    weights = {n: _weight(n, w) for n, w in weights.items()}  # all checked before any layer changes
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise MergeError(
            "adapters are merged into the weights; call al.unmerge(model) before changing the active set"
        )
    for _, layer in adapter_layers(model):
        layer.active = {n: w for n, w in weights.items() if n in layer.deltas}


def _weight(name: str, weight: Any) -> float:
    """An adapter's weight as a finite float, or `ConfigError`."""
    try:
        value = float(weight)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if isinstance(weight, bool) or not math.isfinite(value):
        raise ConfigError(
            f"weight {weight!r} for adapter {name!r} is not a finite number; use e.g. 1.0 or 0.5"
        )
    return value


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone: `with al.disabled(model): model(x)`. Merged adapters are unmerged
    for the duration and merged back afterwards."""
    layers = [layer for _, layer in adapter_layers(model)]
    merged = [dict(layer.merged) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, weights in zip(layers, merged, strict=True):
            layer.disabled = False
            if weights:
                layer.merge(weights)


@contextmanager
def routing(model: nn.Module, ids: Sequence[str | None]) -> Iterator[nn.Module]:
    """Per-sample adapters for one batch: `ids[i]` names the adapter sample i (batch dim 0) runs
    with, or None for the base model alone. Works for training too; the active set is ignored
    inside the block."""
    ids = list(ids)
    _require(model, sorted({n for n in ids if n is not None}, key=str))
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise MergeError("adapters are merged into the weights; call al.unmerge(model) before routing")
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(ids):
        if name is not None:
            rows.setdefault(name, []).append(i)
    index = {name: torch.tensor(r, dtype=torch.long) for name, r in rows.items()}
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        groups = [(n, r) for n, r in index.items() if n in layer.deltas]
        device = next((t.device for t in layer.parameters()), None)  # the slots live beside the layer
        layer.routes = Routes.of(len(ids), groups, device)
    try:
        yield model
    finally:
        for layer in layers:
            layer.routes = None


def merge(model: nn.Module, names: list[str] | None = None, safe: bool = True) -> dict[str, float]:
    """Fold active adapters (all of them, or `names`) into the base weights, with their active
    weights. `safe` refuses a merge that gives NaN/Inf, leaving every weight as it was: fp16/bf16
    layers are checked as they merge (each ΔW computed once) and undone exactly on a refusal, the
    others before any weight is written.

    A quantized base (bitsandbytes 4/8-bit, torchao int8) is dequantized, W + Σ w·ΔW is formed
    in fp32 and requantized; `unmerge` puts the original quantized weight back bit for bit.
    Returns {module path: rounding error}, max |requantized − (W + Σ w·ΔW)|, for those modules
    (empty for a full-precision model), and warns when the error is at least the largest entry
    of Σ w·ΔW: then the merged model keeps only part of the adapter (keep it unmerged, or merge
    into a dequantized model, `al.dequantize`)."""
    return _merge_active(model, names, safe)


def _merge_active(model: nn.Module, names: list[str] | None, safe: bool) -> dict[str, float]:
    refusal = getattr(model, "merge_refusal", None)  # set by adapters that are not weight deltas (LEVI)
    if refusal:
        raise MergeError(refusal)
    current = active(model)
    chosen = list(current) if names is None else _require(model, names)
    inactive = [n for n in chosen if n not in current]
    if inactive:
        raise MergeError(f"adapter(s) {inactive} are not active; al.set_active them before merging")
    layers = [
        (path, layer, {n: layer.active[n] for n in chosen if n in layer.active})
        for path, layer in adapter_layers(model)
    ]
    layers = [(p, layer, w) for p, layer, w in layers if w]
    for path, layer, weights in layers:
        twice = [n for n in weights if n in layer.merged]
        if twice:
            raise MergeError(
                f"adapter(s) {twice} are merged already (at {path!r}); call al.unmerge(model) first"
            )
        unmergeable = [n for n in weights if not layer.deltas[n].mergeable]
        if unmergeable:
            raise MergeError(f"adapter(s) {unmergeable} cannot be merged into weights; keep them unmerged")
        refusal = quant.merge_refusal(layer.base_layer)
        if refusal:
            raise MergeError(f"{path!r}: {refusal}; nothing was merged")
    require_unshared(model, [(path, layer) for path, layer, _ in layers])  # tied weights: refused
    merge_all(layers, safe)
    errors = {path: layer.merge_error for path, layer, _ in layers if layer.merge_error is not None}
    lossy = [
        path
        for path, layer, _ in layers
        if layer.merge_error is not None and layer.merge_error >= layer._merge_change > 0
    ]
    if lossy:
        path = max(lossy, key=errors.__getitem__)
        warnings.warn(
            f"merging into quantized weights: in {len(lossy)} module(s) the rounding error is at least the "
            f"adapter's largest change (worst: {path!r}, error {errors[path]:.3g}), so the merged model keeps "
            "only part of the adapter. Keep it unmerged, or merge into a dequantized model "
            "(al.dequantize(model, torch.bfloat16), then al.merge)",
            UserWarning,
            stacklevel=2,
        )
    return errors


def unmerge(model: nn.Module) -> None:
    """Restore every merged base weight (exactly, for dtypes that cannot round-trip)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _unwrap(model: nn.Module, path: str, layer: AdapterLayer) -> None:
    parent_path, _, leaf = path.rpartition(".")
    if isinstance(layer.base_layer, ExpertWeights):
        detach(model.get_submodule(parent_path), leaf, layer.base_layer)
        return
    install(model, path, layer.base_layer)


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every wrapper. With `merge=True` the active adapters are merged first (safely);
    otherwise merged adapters are unmerged, giving back the original model (its running statistics too)."""
    if merge:
        if getattr(model, "merge_refusal", None):
            raise MergeError(model.merge_refusal)
        merged = {n for _, layer in adapter_layers(model) for n in layer.merged}
        pending = [n for n in active(model) if n not in merged]
        if pending:
            _merge_active(model, pending, safe=True)
    else:
        unmerge(model)
    for path, layer in list(adapter_layers(model)):
        _unwrap(model, path, layer)
    running_stats.release(model, restore=not merge)  # merge keeps the adapted statistics
    flags = model.__dict__.pop(_FLAGS, {})
    model.__dict__.pop("save_pretrained", None)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    return model


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized linear layer of `model` (bitsandbytes 4/8-bit, torchao), adapted
    or not, by an `nn.Linear` of `dtype` holding its dequantized weight; return `model`.

    Adapters stay attached; those merged into a quantized weight are unmerged from it and merged
    again into the new one. Serving a model trained on a 4-bit base in bf16 is
    `al.unload(al.dequantize(model, torch.bfloat16), merge=True)`; a method that edits weight
    entries (SaRA, SFT, HFT, LocFT, dense) needs a dequantized model too."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dequantize: dtype={dtype!r} is not a floating-point torch dtype; use e.g. torch.bfloat16"
        )

    def replace(parent: nn.Module) -> None:
        for leaf, child in list(parent.named_children()):
            if isinstance(child, AdapterLayer):
                if quant.is_quantized(child.base_layer):
                    weights = dict(child.merged)
                    child.unmerge()
                    child.base_layer = quant.dequantized_linear(child.base_layer, dtype)
                    if weights:
                        child.merge(weights)
            elif quant.is_quantized(child):
                setattr(parent, leaf, quant.dequantized_linear(child, dtype))
            else:
                replace(child)

    replace(model)
    return model


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; wrappers left without deltas are removed too."""
    _require(model, name)
    if any(name in layer.merged for _, layer in adapter_layers(model)):
        raise MergeError(f"adapter {name!r} is merged; call al.unmerge(model) before deleting it")
    for path, layer in list(adapter_layers(model)):
        if name in layer.deltas:
            del layer.deltas[name]
            layer.active.pop(name, None)
            if not layer.deltas:
                _unwrap(model, path, layer)


@dataclass
class Summary:
    """Parameter counts: `trainable`, `total`, and per adapter (params, bytes)."""

    trainable: int
    total: int
    per_adapter: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} / {self.total:,} ({100 * self.fraction:.3f}%)"]
        for name, (n, b) in self.per_adapter.items():
            lines.append(f"  adapter {name!r}: {n:,} params, {b / 2**20:.2f} MiB")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> Summary:
    """How many parameters train, in all and per adapter. A quantized weight counts its logical
    entries (a 4-bit weight packs two in a byte)."""
    unique = {id(p): p for p in model.parameters()}.values()
    logical = {
        id(m.weight): math.prod(quant.logical_shape(m)) for m in model.modules() if quant.is_quantized(m)
    }
    per: dict[str, tuple[int, int]] = {}
    for name in adapters(model):
        ps = [p for _, _, delta in deltas(model, name) for p in delta.parameters()]
        per[name] = (sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps))
    return Summary(
        sum(p.numel() for p in unique if p.requires_grad),
        sum(logical.get(id(p), p.numel()) for p in unique),
        per,
    )


def training_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """{name: config} of the adapters with a parameter that requires grad (the ones training)."""
    return {
        name: config
        for name, config in adapters(model).items()
        if any(p.requires_grad for _, _, delta in deltas(model, name) for p in delta.parameters())
    }


def before_step(model: nn.Module, step: int) -> None:
    """Call between `loss.backward()` and `optimizer.step()` of step `step` (0-based): each training
    adapter's method adds its gradient terms or masks (SaRA's nuclear norm, LT-SFT's support, HFT's
    frozen half). `AdapterCallback` calls it for `transformers.Trainer`."""
    for name, config in training_adapters(model).items():
        config.before_step(model, name, step)


def after_step(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Call right after `optimizer.step()` of step `step`, before the gradients are zeroed: each
    training adapter's method runs its schedule (SaRA's re-selection, LT-SFT's phase switch);
    `optimizer` gets its state reset for parameters a schedule re-purposes."""
    for name, config in training_adapters(model).items():
        config.after_step(model, name, step, optimizer)
