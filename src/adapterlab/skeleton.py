"""Skeleton modules: a module of a fingerprint entry's type whose only tensor is its weight (read
from a checkpoint when merging, zeros otherwise), so a method's own `make_delta` works without the
base model. Used by the CLI's merge, export, validate and combine.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AdapterFileError, UnsupportedModuleError
from .experts import KINDS

_CONVS = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


# -- skeleton modules -----------------------------------------------------------------------------
@functools.cache
def _named(base: type[nn.Module], name: str) -> type[nn.Module]:
    """`base` itself, or a subclass called `name`: a skeleton keeps its module's type name, so a
    fingerprint computed on it (al.save of a combined adapter) equals the original one."""
    if base.__name__ == name:
        return base
    return type(name, (base,), {"__module__": base.__module__, "__doc__": f"skeleton of a {name}"})


def _empty_module(kind: str, shape: list[int], groups: int, index: int = 0) -> nn.Module:
    """A module of type `kind` with a weight of `shape`, built on the meta device (no memory)."""
    if kind == "Conv1D":
        from transformers.pytorch_utils import Conv1D  # weight (in, out); must be transformers' own class

        with torch.device("meta"):
            return Conv1D(shape[1], shape[0])
    if kind in _CONVS and len(shape) == int(kind[4]) + 2:
        return _CONVS[kind](
            # kernel_size: len(shape) - 2 entries, checked above (torch types it per class)
            shape[1] * groups,
            shape[0],
            tuple(shape[2:]),  # type: ignore[arg-type]
            groups=groups,
            bias=False,
            device="meta",
        )
    if kind in KINDS and len(shape) == 3:  # a stacked MoE expert weight (experts.py)
        return KINDS[kind](nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False), index)
    if kind.endswith("Linear") and len(shape) == 2:
        return _named(nn.Linear, kind)(shape[1], shape[0], bias=False, device="meta")
    if kind.endswith("RMSNorm") and len(shape) == 1:
        return _named(nn.RMSNorm, kind)(shape, device="meta")
    if kind.endswith("LayerNorm") and len(shape) == 1:
        return _named(nn.LayerNorm, kind)(shape, bias=False, device="meta")
    raise UnsupportedModuleError(
        f"cannot rebuild a {kind!r} module with weight shape {shape} without the model; the CLI rebuilds Linear, "
        "transformers Conv1D, Conv1d/2d/3d, LayerNorm and RMSNorm modules and stacked MoE expert weights. Use the Python API with the model"
    )


def skeleton(entry: dict[str, Any], weight: Tensor) -> nn.Module:
    """A module of the fingerprint `entry`'s type whose only parameter is `weight` (frozen)."""
    shape = list(entry["shape"])
    if list(weight.shape) != shape:
        raise AdapterFileError(
            f"a {entry['type']} of weight shape {shape} cannot take a weight of shape {list(weight.shape)}"
        )
    module = _empty_module(entry["type"], shape, int(entry.get("groups", 1)), int(entry.get("index", 0)))
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


def zeros(shape: list[int], dtype: torch.dtype) -> Tensor:
    """A zero tensor of `shape` that takes no memory (one element, expanded)."""
    return torch.zeros((), dtype=dtype).expand(shape)


def _natural(path: str) -> list[Any]:
    """Sort key that puts `layers.2` before `layers.10` (close to model order)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def skeleton_model(modules: dict[str, dict[str, Any]], dtype: torch.dtype) -> nn.Module:
    """A container holding a zero-weight skeleton at every path of `modules` (in natural order)."""
    root = nn.Module()
    for path in sorted(modules, key=_natural):
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(leaf, skeleton(modules[path], zeros(modules[path]["shape"], dtype)))
    return root
