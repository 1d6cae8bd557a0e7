"""Hot-swap: replace an adapter's tensors in place with a saved adapter's, so a `torch.compile`d
model keeps its graphs (no recompilation).

    al.inject(model, "lora", r=8, targets=...)       # or al.load(model, "adapters/a")
    al.prepare_hotswap(model, max_rank=16)           # optional, before compiling: room for ranks ≤ 16
    compiled = torch.compile(model)
    al.hotswap(model, "adapters/b")                  # same targets, rank ≤ 16: no recompile

Compiled graphs guard on tensor shapes, dtypes and the Python numbers they read, not on tensor
values; so a swap writes the new values into the existing tensors (`copy_`) and changes no shape
and no Python attribute:

- LoRA: a loaded adapter of lower rank r' fills the first r' rows of A and columns of B, the rest
  zero (ΔW unchanged). The delta keeps its scaling s; the loaded adapter's own s' = α'/r' is
  folded into B (B ← B'·s'/s), so ΔW = s'·B'A' exactly up to fp rounding whatever α' and r' are.
  `prepare_hotswap` pads every factor to `max_rank` with zeros first (ΔW unchanged; the config
  then says r = max_rank and an α that keeps s).
- Other methods (SaRA, SFT, HFT, LocFT, dense): the loaded tensors must have exactly the shapes of
  the adapter's (sparse deltas: the same number of entries k; their indices are copied too).

Everything is checked before anything is written: on any error the model is unchanged. The
adapter's config (dropout, targets) stays the one it was built with; only tensors change.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .errors import AdapterNameError, ConfigError, HotswapError, MergeError
from .io import PREFIX, _module_paths, check_fingerprint, read_adapter
from .layer import AdapterLayer, Delta
from .methods.lora import LinearLoRA, LoRAConfig, LowRankDelta
from .methods.sparse import SparseDelta, check_indices
from .model import adapter_layers, adapters, unwrapped


def _layers(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer, Delta]]:
    found = [(path, layer, layer.deltas[name]) for path, layer in adapter_layers(model) if name in layer.deltas]
    if not found:
        raise AdapterNameError(f"no adapter named {name!r} on this model; adapters: {sorted(adapters(model)) or 'none'}")
    return found


def prepare_hotswap(model: nn.Module, max_rank: int, name: str = "default") -> nn.Module:
    """Pad LoRA adapter `name` to rank `max_rank` with zeros (ΔW unchanged), so that `hotswap` can
    later load any adapter of rank ≤ `max_rank` into it without changing a shape. Call it before
    `torch.compile`. The config becomes r = max_rank with the α that keeps each delta's scaling
    (so `al.save` still writes this ΔW). Returns `model`."""
    found = _layers(unwrapped(model), name)
    config = found[0][2].config
    if not isinstance(config, LoRAConfig):
        raise HotswapError(f"prepare_hotswap pads LoRA ranks; adapter {name!r} is {config.method!r}, whose shapes "
                           "do not depend on a rank: hot-swap it directly with al.hotswap (same shapes needed)")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < config.r:
        raise HotswapError(f"max_rank={max_rank!r} must be an integer >= adapter {name!r}'s rank r={config.r}; "
                           f"pass the largest rank you will hot-swap in (e.g. max_rank={max(16, config.r)})")
    if max_rank == config.r:
        return model
    for path, _, delta in found:
        if not delta.refactorable:
            raise HotswapError(f"{path!r}: a grouped kernel-layout conv LoRA keeps its rank split across groups, so it "
                               f"cannot be zero-padded; hot-swap adapters of its rank r={config.r} only (skip prepare_hotswap)")
    scaling = found[0][2].scaling
    padded = dataclasses.replace(config, r=max_rank,
                                 alpha=scaling * (math.sqrt(max_rank) if config.rslora else max_rank))
    with torch.no_grad():
        for _, _, delta in found:
            inner = delta.lora_A.weight.shape[0] // config.r * max_rank
            for factor, dim in ((delta.lora_A, 0), (delta.lora_B, 1)):
                w = factor.weight
                shape = list(w.shape)
                shape[dim] = inner
                new = w.new_zeros(shape)
                new.narrow(dim, 0, w.shape[dim]).copy_(w)
                w.data = new
                w.grad = None
            delta.config = padded
    return model


def hotswap(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Replace adapter `name`'s tensors in place with those of the adapter saved in `directory`
    (by `al.save`, or a PEFT LoRA directory), keeping every shape, so a compiled model does not
    recompile. The saved adapter must have the same method and the same target modules; LoRA
    ranks up to the adapter's current rank (see `prepare_hotswap`), other methods equal shapes.
    Atomic: everything is checked first, and on error nothing has changed. Returns `model`."""
    inner = unwrapped(model)
    found = _layers(inner, name)
    config = found[0][2].config
    block, tensors = read_adapter(directory)
    where = f"hotswap {str(directory)!r} into adapter {name!r}"
    if block["method"] != config.method:
        raise HotswapError(f"{where}: the file holds a {block['method']!r} adapter, {name!r} is {config.method!r}; "
                           f"load it as a new adapter instead: al.load(model, {str(directory)!r}, name='...')")
    loaded = AdapterConfig.from_dict(block["config"])
    if isinstance(config, LoRAConfig) and loaded.conv_mode != config.conv_mode \
            and not all(isinstance(d, LinearLoRA) for _, _, d in found):
        raise HotswapError(f"{where}: the file's conv_mode={loaded.conv_mode!r} differs from the adapter's "
                           f"{config.conv_mode!r} (another factor layout); load it as a new adapter instead")
    merged = [path for path, layer, _ in found if name in layer.merged]
    if merged:
        raise MergeError(f"{where}: the adapter is merged (at {merged[0]!r}); call al.unmerge(model) first")
    check_fingerprint(inner, block["fingerprint"])
    have = {path for path, _, _ in found}
    given = set(_module_paths(inner, tensors, directory))
    if have != given:
        extra, missing = sorted(given - have), sorted(have - given)
        what = (f"the file adapts {extra[0]!r}, which adapter {name!r} does not" if extra
                else f"the file has nothing for {missing[0]!r}, which adapter {name!r} adapts")
        raise HotswapError(f"{where}: the target modules differ ({what}; {len(extra)} extra, {len(missing)} missing). "
                           "Hot-swap needs the same targets; load it as a new adapter with al.load(model, dir, name=...)")
    writes = [w for path, _, delta in found
              for w in _planned_writes(where, path, delta, tensors, loaded)]
    with torch.no_grad():
        for target, value in writes:
            target.copy_(value)
    return model


def _own(tensors: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    prefix = f"{PREFIX}{path}."
    return {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}


def _planned_writes(where: str, path: str, delta: Delta, tensors: dict[str, Tensor],
                    loaded: AdapterConfig) -> list[tuple[Tensor, Tensor]]:
    """(target tensor, new value of its exact shape) for one module, after checking the file's
    tensors fit; nothing is written here."""
    own, state = _own(tensors, path), delta.state_dict(keep_vars=True)
    if set(own) != set(state):
        raise HotswapError(f"{where}: {path!r} has tensors {sorted(own)} in the file but {sorted(state)} in the "
                           "adapter (another kind of delta); load it as a new adapter instead")
    for key, target in state.items():
        if own[key].is_floating_point() != target.is_floating_point():
            raise HotswapError(f"{where}: {path}.{key} is {own[key].dtype} in the file, {target.dtype} in the adapter")
    if isinstance(delta, LowRankDelta):
        return _lora_writes(where, path, delta, own, loaded)
    for key, target in state.items():
        if own[key].shape != target.shape:
            raise HotswapError(f"{where}: {path}.{key} has shape {list(own[key].shape)} in the file but "
                               f"{list(target.shape)} in the adapter; hot-swap needs equal shapes for "
                               f"{delta.config.method!r} (e.g. the same number of sparse entries)")
    if isinstance(delta, SparseDelta):  # the file's support must be one this weight can hold
        try:
            check_indices(own["indices"], delta.numel, what=f"{path}.indices in the file")
        except ConfigError as e:
            raise HotswapError(f"{where}: {e}") from None
    return [(target, own[key]) for key, target in state.items()]


def _lora_writes(where: str, path: str, delta: LowRankDelta, own: dict[str, Tensor],
                 loaded: AdapterConfig) -> list[tuple[Tensor, Tensor]]:
    """A, B padded with zeros to the adapter's rank, B times s'/s (the loaded scaling over ours)."""
    a, b = delta.lora_A.weight, delta.lora_B.weight
    new_a, new_b = own["lora_A.weight"], own["lora_B.weight"]
    rank, new_rank = a.shape[0], new_a.shape[0]
    fits = (new_a.dim() == a.dim() and new_b.dim() == b.dim() and new_a.shape[1:] == a.shape[1:]
            and new_b.shape[0] == b.shape[0] and new_b.shape[2:] == b.shape[2:] and new_b.shape[1] == new_rank
            if delta.refactorable else new_a.shape == a.shape and new_b.shape == b.shape)
    if not fits:
        raise HotswapError(f"{where}: {path!r} has lora_A {list(new_a.shape)} and lora_B {list(new_b.shape)} in the "
                           f"file; the adapter has {list(a.shape)} and {list(b.shape)} (another layer shape or layout)")
    if new_rank > rank:
        raise HotswapError(f"{where}: {path!r} has rank r={loaded.r} in the file, above the adapter's r={delta.config.r}; call "
                           f"al.prepare_hotswap(model, max_rank={loaded.r}) (or larger) before compiling")
    pad_a = a.new_zeros(a.shape)
    pad_a[:new_rank] = new_a
    pad_b = b.new_zeros(b.shape)
    pad_b[:, :new_rank] = new_b.to(torch.float64) * (loaded.scaling / delta.scaling)
    return [(a, pad_a), (b, pad_b)]
