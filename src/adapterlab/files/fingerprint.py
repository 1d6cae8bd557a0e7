"""The fingerprint of an adapter's targets: every targeted module's type and weight shape (its
logical shape for a quantized base), and their sha256; checked against a model at load."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from .. import quant
from ..errors import FingerprintMismatchError
from ..layer import base_weight
from ..targeting import is_conv, logical_modules

__all__ = ["fingerprint", "modules_sha256", "require_fingerprint_match"]


def fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """The targeted modules' types and weight shapes, and a hash of them."""
    modules = dict(logical_modules(model))
    info = {p: _module_info(modules[p]) for p in sorted(paths)}
    return {"modules": info, "sha256": modules_sha256(info)}


def modules_sha256(modules: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(modules, sort_keys=True).encode()).hexdigest()


def _module_info(module: nn.Module) -> dict[str, Any]:
    """Type and weight shape; a conv with groups != 1 also records them (the shape alone does not
    give the input channels). Modules without groups keep the old entry, so old hashes hold.
    A quantized Linear is recorded as the Linear it stands for (its logical shape), so an adapter
    trained on a 4-bit base fits the full-precision model too."""
    if quant.is_quantized(module):
        return {"type": "Linear", "shape": list(quant.logical_shape(module))}
    info: dict[str, Any] = {"type": type(module).__name__, "shape": list(base_weight(module).shape)}
    extra = getattr(module, "fingerprint_fields", None)  # experts.py: a stacked expert weight's index
    if callable(extra):
        info.update(extra())
    if is_conv(module) and module.groups != 1:
        info["groups"] = module.groups
    return info


def require_fingerprint_match(model: nn.Module, expected: dict[str, Any]) -> None:
    """Raise `FingerprintMismatchError` unless `model` has every fingerprinted module, same shapes."""
    modules = dict(logical_modules(model))
    problems = []
    for path, want in expected.get("modules", {}).items():
        have = modules.get(path)
        if have is None:
            problems.append(f"{path!r} is missing")
            continue
        weight = getattr(have, "weight", None)
        shape = list(quant.logical_shape(have)) if isinstance(weight, torch.Tensor) else None
        if shape != want["shape"]:
            problems.append(f"{path!r} has weight shape {shape}, the adapter expects {want['shape']}")
    if problems:
        raise FingerprintMismatchError(
            f"this adapter was made for another base model: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Load it into the model it was trained on"
        )
