"""Running statistics: buffers that a forward pass in train mode changes (BatchNorm's and
InstanceNorm's `running_mean`, `running_var`, `num_batches_tracked`; any module's `running_*`).

They are not weights, so no delta holds them; an adapter trained with the model in train mode
moves them all the same. The choice (docs/training.md#running-statistics): they belong to the
adapter. `al.save` stores the ones that changed since the adapter was added (inject or load),
`al.load` writes them into the model, `al.unload(model)` puts the values from before the first
adapter back, and `al.unload(model, merge=True)` keeps them (the fine-tuned model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import AdapterFileError
from .targeting import logical_modules

_SNAPSHOTS = "_adapterlab_running_stats"  # {"": before any adapter, adapter name: when it was added}


def is_running_stat(name: str) -> bool:
    """A buffer name that holds a running statistic (the last part of a state-dict key)."""
    leaf = name.rpartition(".")[2]
    return leaf.startswith("running_") or leaf == "num_batches_tracked"


def running_stats(model: nn.Module) -> dict[str, Tensor]:
    """{"<module path>.<buffer>": buffer} of every running statistic, at the modules' logical paths
    (an adapted module's `.base_layer` is not part of its path)."""
    return {
        f"{path}.{name}" if path else name: buf
        for path, module in logical_modules(model)
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None and is_running_stat(name)
    }


def remember(model: nn.Module, name: str) -> None:
    """Note the running statistics as they are when adapter `name` is added (before the first
    adapter too, for `restore`). Models without any keep nothing."""
    stats = running_stats(model)
    if not stats:
        return
    copy = {k: v.detach().clone() for k, v in stats.items()}
    snapshots = model.__dict__.setdefault(_SNAPSHOTS, {"": copy})
    snapshots[name] = copy


def changed(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The running statistics that differ from their values when adapter `name` was added."""
    before = model.__dict__.get(_SNAPSHOTS, {}).get(name, {})
    return {
        k: v.detach().contiguous().cpu()
        for k, v in running_stats(model).items()
        if k in before and not torch.equal(v, before[k].to(v.device))
    }


def check(model: nn.Module, stats: dict[str, Tensor], where: str) -> None:
    """Raise `AdapterFileError` unless every entry of `stats` (from a file) names a running statistic
    of `model` with the same shape and kind (float / integer) and holds only finite values."""
    have = running_stats(model)
    for key, value in stats.items():
        target = have.get(key)
        if target is None:
            raise AdapterFileError(
                f"{where}: running statistic {key!r} is not a buffer of this model (it has "
                f"{len(have)}); load the adapter into the model it was trained on"
            )
        if value.shape != target.shape or value.is_floating_point() != target.is_floating_point():
            raise AdapterFileError(
                f"{where}: running statistic {key!r} has shape {list(value.shape)} ({value.dtype}), the model's "
                f"{list(target.shape)} ({target.dtype}); load the adapter into the model it was trained on"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(f"{where}: running statistic {key!r} holds NaN/Inf; re-save the adapter")


@torch.no_grad()
def write(model: nn.Module, stats: dict[str, Tensor]) -> None:
    """Copy checked `stats` into the model's buffers (in their dtype and device)."""
    have = running_stats(model)
    for key, value in stats.items():
        have[key].copy_(value)


def release(model: nn.Module, restore: bool) -> None:
    """Forget the snapshots (unload); with `restore`, first put the values from before the first
    adapter back."""
    snapshots = model.__dict__.pop(_SNAPSHOTS, {})
    if restore and "" in snapshots:
        have = running_stats(model)
        write(model, {k: v for k, v in snapshots[""].items() if k in have})
