"""Adapters without their base model: skeleton modules rebuilt from an adapter's fingerprint.

A saved adapter records, for every module it targets, the module's type and weight shape (its
fingerprint: `{path: {"type": "Linear", "shape": [out, in]}}`, plus `"groups"` for grouped convs).
That is enough to rebuild a *skeleton*: a module of that type whose only tensor is its weight —
the real weight read from a checkpoint shard when merging, zeros otherwise. The method's own
`make_delta` / `loaded_delta` then build the delta on it and `delta_weight()` gives ΔW, so every
method works here without per-method code.

PEFT-written LoRA directories carry no fingerprint: their modules are Linear (Conv1D with PEFT's
`fan_in_fan_out`, ConvNd for conv factors), with shapes read off `lora_A` / `lora_B`.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .errors import AdapterFileError, AdapterlabError, UnsupportedModuleError
from .io import CONFIG_FILE, PREFIX, read_adapter
from .layer import Delta
from .methods.lora import LoRAConfig

_CONVS = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
_PEFT_FACTOR = re.compile(r"(?P<path>.+)\.lora_(?P<which>[AB])\.weight")


# -- skeleton modules -----------------------------------------------------------------------------
@functools.cache
def _named(base: type[nn.Module], name: str) -> type[nn.Module]:
    """`base` itself, or a subclass called `name`: a skeleton keeps its module's type name, so a
    fingerprint computed on it (al.save of a combined adapter) equals the original one."""
    if base.__name__ == name:
        return base
    return type(name, (base,), {"__module__": base.__module__, "__doc__": f"skeleton of a {name}"})


def _empty_module(kind: str, shape: list[int], groups: int) -> nn.Module:
    """A module of type `kind` with a weight of `shape`, built on the meta device (no memory)."""
    if kind == "Conv1D":
        from transformers.pytorch_utils import Conv1D  # weight (in, out); must be transformers' own class

        with torch.device("meta"):
            return Conv1D(shape[1], shape[0])
    if kind in _CONVS and len(shape) == int(kind[4]) + 2:
        return _CONVS[kind](shape[1] * groups, shape[0], tuple(shape[2:]), groups=groups, bias=False, device="meta")
    if kind.endswith("Linear") and len(shape) == 2:
        return _named(nn.Linear, kind)(shape[1], shape[0], bias=False, device="meta")
    if kind.endswith("RMSNorm") and len(shape) == 1:
        return _named(nn.RMSNorm, kind)(shape, device="meta")
    if kind.endswith("LayerNorm") and len(shape) == 1:
        return _named(nn.LayerNorm, kind)(shape, bias=False, device="meta")
    raise UnsupportedModuleError(
        f"cannot rebuild a {kind!r} module with weight shape {shape} without the model; the CLI rebuilds Linear, "
        "transformers Conv1D, Conv1d/2d/3d, LayerNorm and RMSNorm modules. Use the Python API with the model")


def skeleton(entry: dict[str, Any], weight: Tensor) -> nn.Module:
    """A module of the fingerprint `entry`'s type whose only parameter is `weight` (frozen)."""
    shape = list(entry["shape"])
    if list(weight.shape) != shape:
        raise AdapterFileError(f"a {entry['type']} of weight shape {shape} cannot take a weight of shape "
                               f"{list(weight.shape)}")
    module = _empty_module(entry["type"], shape, int(entry.get("groups", 1)))
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


# -- adapter files --------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """A saved adapter: its metadata block, tensors, config, and the modules it targets."""

    directory: Path
    block: dict[str, Any]
    tensors: dict[str, Tensor]
    config: AdapterConfig
    modules: dict[str, dict[str, Any]]          # path -> fingerprint entry {type, shape[, groups]}
    peft_config: dict[str, Any] | None = None   # adapter_config.json, when it is PEFT's LoraConfig
    _owned: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> AdapterFile:
        """Read `directory` (adapterlab's or PEFT's LoRA); every failure is an `AdapterFileError`."""
        root = Path(directory)
        block, tensors = read_adapter(root)
        peft = _peft_config(root)
        config = AdapterConfig.from_dict(block["config"])
        if block["method"] == "levi":
            modules = {}
        elif (block.get("fingerprint") or {}).get("modules"):
            modules = block["fingerprint"]["modules"]
        else:
            modules = _peft_modules(root, tensors, bool((peft or {}).get("fan_in_fan_out")))
        adapter = cls(root, block, tensors, config, modules, peft)
        adapter._owned = _by_module(root, tensors, modules) if modules else {}
        return adapter

    @property
    def method(self) -> str:
        return self.block["method"]

    @property
    def name(self) -> str:
        return str(self.directory)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype for zero skeletons: float64 if the adapter holds float64 tensors (it was
        trained on a float64 base), else float32 (what adapters train in on every other base)."""
        return torch.float64 if any(t.dtype == torch.float64 for t in self.tensors.values()) else torch.float32

    def require_deltas(self, doing: str) -> None:
        """Raise unless the adapter is made of weight deltas (LEVI is a side network)."""
        if self.method == "levi":
            raise AdapterFileError(f"{self.name!r} holds a LEVI side network, not weight deltas: it cannot be "
                                   f"{doing}. Use it with al.levi.load(backbone, directory)")

    def delta(self, path: str, module: nn.Module) -> Delta:
        """The delta of module `path`, built on `module` (a skeleton) and filled from the file."""
        own = self._owned[path]
        self._check_lora_shapes(path, own)
        built = self.config.make_delta(module)
        try:
            delta = self.config.loaded_delta(module, built, own)
        except AdapterlabError as e:
            raise AdapterFileError(f"{self.name!r} does not fit {path!r}: {e}") from None
        state = delta.state_dict()
        missing, unexpected = sorted(set(state) - set(own)), sorted(set(own) - set(state))
        if missing or unexpected:
            raise AdapterFileError(f"{self.name!r}: module {path!r} needs tensors {sorted(state)}, the file has "
                                   f"{sorted(own)}; re-save the adapter")
        with torch.no_grad():
            for key, target in state.items():
                given = own[key]
                if given.shape != target.shape or given.is_floating_point() != target.is_floating_point():
                    raise AdapterFileError(f"{self.name!r}: tensor {PREFIX}{path}.{key} has shape {list(given.shape)} "
                                           f"({given.dtype}); the module needs {list(target.shape)} ({target.dtype})")
                target.copy_(given)
        return delta

    def _check_lora_shapes(self, path: str, own: dict[str, Tensor]) -> None:
        """LoRA factor sizes come from the config's r: compare them with the file before allocating."""
        if not isinstance(self.config, LoRAConfig):
            return
        entry = self.modules[path]
        dry = self.config.make_delta(skeleton(entry, torch.empty(entry["shape"], device="meta")))
        for key, want in dry.state_dict().items():
            given = own.get(key)
            if given is None or given.shape != want.shape:
                has = "is missing" if given is None else f"has shape {list(given.shape)}"
                raise AdapterFileError(f"{self.name!r}: tensor {PREFIX}{path}.{key} {has}; a {entry['type']} of "
                                       f"weight shape {entry['shape']} needs {list(want.shape)} (r={self.config.r})")


def _peft_config(root: Path) -> dict[str, Any] | None:
    """adapter_config.json when it is PEFT's LoraConfig (not our block), else None."""
    try:
        cfg = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested too deep
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("peft_type") == "LORA" else None


def _peft_modules(root: Path, tensors: dict[str, Tensor], fan_in_fan_out: bool) -> dict[str, dict[str, Any]]:
    """Fingerprint entries for a PEFT LoRA directory, from its factors' shapes."""
    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        found = _PEFT_FACTOR.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if found is None:
            raise AdapterFileError(f"{str(root)!r}: tensor {key!r} is not a LoRA factor "
                                   f"('{PREFIX}<module>.lora_A.weight' / lora_B); adapterlab rebuilds only those")
        factors.setdefault(found["path"], {})[found["which"]] = t
    modules = {}
    for path, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"{str(root)!r}: module {path!r} has lora_{''.join(ab)} but not both factors")
        a, b = ab["A"].shape, ab["B"].shape
        if len(a) == 2:
            kind = "Conv1D" if fan_in_fan_out else "Linear"
            modules[path] = {"type": kind, "shape": [a[1], b[0]] if fan_in_fan_out else [b[0], a[1]]}
        else:
            modules[path] = {"type": f"Conv{len(a) - 2}d", "shape": [b[0], a[1], *a[2:]]}
    return modules


def _by_module(root: Path, tensors: dict[str, Tensor], modules: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    """Each tensor under the longest module path that prefixes its key, keyed relative to it."""
    owned: dict[str, dict[str, Tensor]] = {path: {} for path in modules}
    for key, t in tensors.items():
        parts = key[len(PREFIX):].split(".") if key.startswith(PREFIX) else []
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in owned), None)
        if owner is None:
            raise AdapterFileError(f"{str(root)!r}: tensor {key!r} belongs to no module of the fingerprint "
                                   f"(keys look like '{PREFIX}<module path>.<param>'); re-save the adapter")
        owned[owner][key[len(PREFIX) + len(owner) + 1:]] = t
    return owned


# -- inspect --------------------------------------------------------------------------------------
SETTINGS = ("r", "alpha", "rslora", "conv_mode", "dropout", "density", "count", "threshold", "seed", "layer",
            "module", "full_steps", "progressive_step")


def inspect_adapter(directory: str | os.PathLike) -> dict[str, Any]:
    """What `adapterlab inspect` reports: method, config and its rank/density settings, targets
    (count and module types), parameter counts, size on disk, fingerprint."""
    adapter = AdapterFile.open(directory)
    block, tensors = adapter.block, adapter.tensors
    fingerprint = block.get("fingerprint") or {}
    config = block.get("config") or {}
    types: dict[str, int] = {}
    for entry in adapter.modules.values():
        types[entry["type"]] = types.get(entry["type"], 0) + 1
    files = [p for p in Path(directory).iterdir() if p.is_file()]
    return {
        "directory": str(directory),
        "method": block["method"],
        "format_version": block["format_version"],
        "library_version": block.get("library_version"),
        "config": config,
        "settings": {k: config[k] for k in SETTINGS if k in config},
        "targets": len(adapter.modules) or len(fingerprint.get("layers", {})),
        "target_types": dict(sorted(types.items())),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "fingerprint": fingerprint.get("sha256"),
    }
