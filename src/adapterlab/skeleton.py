"""Skeleton modules: a module of a fingerprint entry's type whose only tensor is its weight (read
from a checkpoint when merging, zeros otherwise), so a method's own `make_delta` works without the
base model. Used by the CLI's merge, export, validate and combine.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AdapterFileError, UnsupportedModuleError
from .experts import KINDS
from .layer import base_weight
from .targeting import module_path_ok
from .text import excerpt

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
    """A module of type `kind` with a weight of `shape`, built on the meta device (no memory).
    A shape its type cannot have (from a hand-edited fingerprint) is an `AdapterFileError`."""
    try:
        module = _build_module(kind, shape, groups, index)
    except (ValueError, TypeError, IndexError, RuntimeError, OverflowError) as e:
        module = None
        why = f" ({excerpt(str(e), 120)})"
    else:
        why = ""
    if module is None or list(base_weight(module).shape) != list(shape):
        raise AdapterFileError(
            f"the fingerprint's {excerpt(kind, 50)} with weight shape {excerpt(shape)} and groups={groups} "
            f"is not a module of that type{why}; re-save the adapter"
        )
    return module


def _build_module(kind: str, shape: list[int], groups: int, index: int) -> nn.Module:
    if kind == "Conv1D" and len(shape) == 2:
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
    if kind.endswith("Embedding") and len(shape) == 2:  # token embeddings (num_embeddings, dim)
        return _named(nn.Embedding, kind)(shape[0], shape[1], device="meta")
    if kind.endswith("Linear") and len(shape) == 2:
        return _named(nn.Linear, kind)(shape[1], shape[0], bias=False, device="meta")
    if kind.endswith("RMSNorm") and len(shape) == 1:
        return _named(nn.RMSNorm, kind)(shape, device="meta")
    if kind.endswith("LayerNorm") and len(shape) == 1:
        return _named(nn.LayerNorm, kind)(shape, bias=False, device="meta")
    raise UnsupportedModuleError(
        f"cannot rebuild a {excerpt(kind, 50)} module with weight shape {excerpt(shape)} without the model; "
        "the CLI rebuilds Linear, transformers Conv1D, Conv1d/2d/3d, Embedding, LayerNorm and RMSNorm modules and "
        "stacked MoE expert weights. Use the Python API with the model"
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
    """A container holding a zero-weight skeleton at every path of `modules` (in natural order).
    A path with an empty part, or through something that is not a container (a module's weight,
    an attribute such as `training`), is an `AdapterFileError`."""
    root = nn.Module()
    for path in sorted(modules, key=_natural):
        if not module_path_ok(path):
            raise AdapterFileError(f"the fingerprint's module path {excerpt(path)} is not a module path")
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            children = dict(parent.named_children())
            if name not in children:
                _add(parent, name, nn.Module(), path)
            parent = getattr(parent, name)
        _add(parent, leaf, skeleton(modules[path], zeros(modules[path]["shape"], dtype)), path)
    return root


def _add(parent: nn.Module, name: str, child: nn.Module, path: str) -> None:
    if name in dict(parent.named_children()) or hasattr(parent, name):
        raise AdapterFileError(
            f"the fingerprint's module path {excerpt(path)} runs through {name!r}, which is taken "
            "(another module, or an attribute of one); re-save the adapter"
        )
    try:
        parent.add_module(name, child)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(
            f"the fingerprint's module path {excerpt(path)} cannot be built ({excerpt(str(e))})"
        ) from None


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate (MemAvailable, capped by RLIMIT_AS's
    room), or None where the system does not say."""
    found = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            found = None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            found = limit if found is None else min(found, limit)
    except (ImportError, OSError, ValueError):
        pass
    return found


def require_memory(shapes: list[list[int]], dtype: torch.dtype, doing: str, copies: int = 2) -> None:
    """Refuse (`AdapterFileError`) before allocating when dense tensors of `shapes` (sizes from a
    file's fingerprint), `copies` times over, would not fit in the memory this machine has free:
    a small file must not make the CLI allocate gigabytes. Sizes are Python ints (no overflow)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = sum(math.prod(int(d) for d in shape) for shape in shapes) * itemsize * copies
    free = available_memory()
    if free is not None and need > free:
        raise AdapterFileError(
            f"{doing} needs about {need / 1e9:.3g} GB for the dense ΔW of modules the adapter declares "
            f"(largest shape {excerpt(max(shapes, key=lambda s: math.prod(s)))}), more than the "
            f"{free / 1e9:.3g} GB free; check the adapter's fingerprint, or run on a larger machine"
        )
