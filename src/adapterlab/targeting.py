"""Which modules a config hits. One matching rule, used by inject, load and exclude alike:

- a list of names: a module matches a name when its dotted path equals it or ends with "." + name;
- a string: a keyword ("all-linear", "all-conv", "all", "all-experts") or a regex that must match
  the whole path;
- a stacked MoE expert weight is listed at its parameter's path (`….mlp.experts.gate_up_proj`) as an
  `experts.ExpertWeights` module, so it is matched like one;
- `layers`: the first all-digit path component is the layer index.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .config import KEYWORDS, AdapterConfig, TargetSpec
from .errors import TargetError, UnsupportedModuleError, closest
from .experts import ExpertWeights, expert_weights, explain_parameter


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style `Conv1D`: a Linear whose weight is stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def is_embedding(module: nn.Module) -> bool:
    """An `nn.Embedding` (token embeddings: adapted only when targeted by name)."""
    return isinstance(module, nn.Embedding)


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) pairs as the user sees them, the model itself first at path "": a wrapped
    module appears as its base layer, at its original path, and the wrapper's internals are hidden."""
    from .layer import AdapterLayer

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, AdapterLayer):
                yield path, child.base_layer
                yield from walk(path, child.base_layer)
            else:
                yield path, child
                yield from walk(path, child)
                yield from ((f"{path}.{n}", w) for n, w in expert_weights(child))  # experts.py

    yield "", model
    yield from walk("", model)


def module_path_ok(path: object) -> bool:
    """A dotted module path as `named_modules` writes it: non-empty parts without whitespace, at
    most 1,000 characters (file-controlled paths are checked with this before use)."""
    return (
        isinstance(path, str)
        and 0 < len(path) <= 1000
        and all(
            part and part.isprintable() and not any(c.isspace() for c in part) for part in path.split(".")
        )
    )


def layer_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            return None
        return head if isinstance(head, nn.Module) else None
    return None


def matches(path: str, module: nn.Module, spec: TargetSpec, head: nn.Module | None) -> bool:
    if isinstance(spec, str):
        if spec == "all-experts":
            return isinstance(module, ExpertWeights)
        if spec in ("all-linear", "all") and is_linear(module) and module is not head:
            return True
        if spec in ("all-conv", "all"):
            return is_conv(module)
        if spec in ("all-linear", "all-conv", "all"):
            return False
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The modules `config` adapts, in model order. Raises `TargetError` if there are none and
    `UnsupportedModuleError` if a matched module cannot be wrapped by the method."""
    head = output_head(model)
    found, seen, used = [], [], set[str]()
    for path, module in logical_modules(model):
        seen.append(path)
        if not matches(path, module, config.targets, head):
            continue
        if isinstance(config.targets, list):
            used.update(n for n in config.targets if path == n or path.endswith("." + n))
        if config.exclude is not None and matches(path, module, config.exclude, head):
            continue
        if config.layers is not None and layer_index(path) not in config.layers:
            continue
        found.append((path, module))
    unused = [n for n in config.targets if n not in used] if isinstance(config.targets, list) else []
    for n in unused:
        reason = explain_parameter(model, n)
        if reason:
            raise UnsupportedModuleError(f"{config.method}: target {n!r}: {reason}")
    if unused:
        raise TargetError(
            "target name(s) matched no module: "
            + "; ".join(f"{n!r} (closest: {closest(n, seen)})" for n in unused)
        )
    if not found:
        hint = ""
        if config.targets in KEYWORDS:
            hint = f"; the model has no module of that kind (modules: {closest('linear', seen)})"
        raise TargetError(
            f"targets={config.targets!r} (exclude={config.exclude!r}, layers={config.layers!r}) "
            f"matched no module{hint}"
        )
    for path, module in found:
        reason = config.supports(module)
        if reason:
            raise UnsupportedModuleError(
                f"{config.method}: cannot adapt {path!r} ({type(module).__name__}): {reason}. "
                "Narrow `targets` or add it to `exclude`"
            )
    return found


def layer_stacks(model: nn.Module) -> dict[str, list[str]]:
    """{path of a ModuleList/Sequential whose children are numbered: [its children's paths]} in
    model order — the transformer-layer lists (`model.layers`, `transformer.h`, `bert.encoder.layer`)."""
    stacks = {}
    for path, module in logical_modules(model):
        names = [n for n, _ in module.named_children()]
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and names and all(n.isdigit() for n in names):
            stacks[path] = [f"{path}.{n}" if path else n for n in names]
    return stacks
