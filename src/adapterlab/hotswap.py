"""Hot-swap: replace an adapter's tensors in place with a saved adapter's, so a `torch.compile`d
model keeps its graphs (no recompilation). Shapes, dtypes and Python numbers never change; a LoRA
of lower rank is zero-padded (`prepare_hotswap` makes room). docs/precision.md#hot-swap.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from . import running_stats
from .config import AdapterConfig
from .errors import AdapterNameError, HotswapError, MergeError
from .files.adapter_dir import read_adapter, split_by_module
from .files.fingerprint import require_fingerprint_match
from .layer import AdapterLayer, Delta
from .model import adapters, deltas, unwrapped
from .targeting import logical_modules


def _layers(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer, Delta]]:
    found = deltas(model, name)
    if not found:
        raise AdapterNameError(
            f"no adapter named {name!r} on this model; adapters: {sorted(adapters(model)) or 'none'}"
        )
    return found


def prepare_hotswap(model: nn.Module, max_rank: int, name: str = "default") -> nn.Module:
    """Pad LoRA adapter `name` to rank `max_rank` with zeros (ΔW unchanged), so that `hotswap` can
    later load any adapter of rank ≤ `max_rank` into it without changing a shape. Call it before
    `torch.compile`. The config becomes r = max_rank with the α that keeps each delta's scaling
    (so `al.save` still writes this ΔW). Returns `model`."""
    found = _layers(unwrapped(model), name)
    found[0][2].config.pad_for_hotswap({path: delta for path, _, delta in found}, max_rank, name)
    return model


def hotswap(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Replace adapter `name`'s tensors in place with those of the adapter saved in `directory`
    (by `al.save`, or a PEFT LoRA directory), keeping every shape, so a compiled model does not
    recompile. The saved adapter must have the same method and the same target modules; LoRA
    ranks up to the adapter's current rank (see `prepare_hotswap`), other methods equal shapes.
    Running statistics saved with the file (BatchNorm's) are written into the model's buffers too.
    Atomic: everything is checked first, and on error nothing has changed. Returns `model`."""
    inner = unwrapped(model)
    found = _layers(inner, name)
    config = found[0][2].config
    metadata, tensors = read_adapter(directory)
    where = f"hotswap {str(directory)!r} into adapter {name!r}"
    if metadata["method"] != config.method:
        raise HotswapError(
            f"{where}: the file holds a {metadata['method']!r} adapter, {name!r} is {config.method!r}; "
            f"load it as a new adapter instead: al.load(model, {str(directory)!r}, name='...')"
        )
    loaded = AdapterConfig.from_dict(metadata["config"])
    refusal = config.hotswap_refusal(loaded, [delta for _, _, delta in found])
    if refusal:
        raise HotswapError(f"{where}: {refusal}; load it as a new adapter instead")
    merged = [path for path, layer, _ in found if name in layer.merged]
    if merged:
        raise MergeError(f"{where}: the adapter is merged (at {merged[0]!r}); call al.unmerge(model) first")
    require_fingerprint_match(inner, metadata["fingerprint"])
    have = {path for path, _, _ in found}
    owned = split_by_module(
        tensors,
        {p for p, _ in logical_modules(inner)},
        repr(str(directory)),
        "this model; load it into the model it was made for",
    )
    given = set(owned)
    if have != given:
        extra, missing = sorted(given - have), sorted(have - given)
        what = (
            f"the file adapts {extra[0]!r}, which adapter {name!r} does not"
            if extra
            else f"the file has nothing for {missing[0]!r}, which adapter {name!r} adapts"
        )
        raise HotswapError(
            f"{where}: the target modules differ ({what}; {len(extra)} extra, {len(missing)} missing). "
            "Hot-swap needs the same targets; load it as a new adapter with al.load(model, dir, name=...)"
        )
    writes = [w for path, _, delta in found for w in _planned_writes(where, path, delta, owned[path], loaded)]
    running_stats.check(inner, metadata["buffers"], where)  # BatchNorm statistics saved with it
    with torch.no_grad():
        for target, value in writes:
            target.copy_(value)
    running_stats.write(inner, metadata["buffers"])
    return model


def _planned_writes(
    where: str, path: str, delta: Delta, own: dict[str, Tensor], loaded: AdapterConfig
) -> list[tuple[Tensor, Tensor]]:
    """(target tensor, new value of its exact shape) for one module, after checking the file's
    tensors (`own`, keyed as in the delta's state_dict) fit; nothing is written here."""
    state = delta.state_dict(keep_vars=True)
    if set(own) != set(state):
        raise HotswapError(
            f"{where}: {path!r} has tensors {sorted(own)} in the file but {sorted(state)} in the "
            "adapter (another kind of delta); load it as a new adapter instead"
        )
    for key, target in state.items():
        if own[key].is_floating_point() != target.is_floating_point():
            raise HotswapError(
                f"{where}: {path}.{key} is {own[key].dtype} in the file, {target.dtype} in the adapter"
            )
    writes = delta.config.hotswap_values(
        where, path, delta, own, loaded
    )  # LoRA pads ranks; sparse checks indices
    if writes is not None:
        return writes
    for key, target in state.items():
        if own[key].shape != target.shape:
            raise HotswapError(
                f"{where}: {path}.{key} has shape {list(own[key].shape)} in the file but "
                f"{list(target.shape)} in the adapter; hot-swap needs equal shapes for "
                f"{delta.config.method!r} (e.g. the same number of sparse entries)"
            )
    return [(target, own[key]) for key, target in state.items()]
