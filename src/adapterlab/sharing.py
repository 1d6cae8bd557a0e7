"""Shared modules and tied weights. One module object registered at several paths (a layer reused
in two places) is adapted at all of them or none: the one `AdapterLayer` is installed at every
path, so the adapter applies at every use both unmerged and merged. A weight tensor that another
module also uses (`lm_head` tied to the input embedding) is never merged into: merging would
change the other module too, so `al.merge` refuses and says how to untie. docs/reliability.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .errors import AdapterFileError, MergeError, TargetError
from .files.fs import read_regular
from .layer import AdapterLayer


def _walk(prefix: str, module: nn.Module, above: frozenset = frozenset()) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every registration under `module`, duplicates included (a wrapper's own
    internals hidden: an `AdapterLayer` shows as itself, its base layer's children below it). A
    module registered inside itself is not followed again."""
    above = above | {id(module)}
    for name, child in vars(module)["_modules"].items():  # every name, even a repeated object
        if child is None or id(child) in above:
            continue
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        yield from _walk(path, child.base_layer if isinstance(child, AdapterLayer) else child, above)


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every path it is registered at}, for modules registered more than once."""
    found: dict[int, list[str]] = {}
    for path, module in _walk("", model):
        key = id(module.base_layer) if isinstance(module, AdapterLayer) else id(module)
        found.setdefault(key, []).append(path)
    return {k: v for k, v in found.items() if len(v) > 1}


def shared_targets(
    model: nn.Module, targets: list[tuple[str, nn.Module]], exact: bool
) -> list[tuple[str, nn.Module]]:
    """`targets` with each shared module once (at its first path). With `exact` (paths from a
    file) every path of a shared module is adapted; otherwise targeting some of its paths but not
    all is a `TargetError` naming them: its weight is one tensor, so it cannot differ per place."""
    aliases = module_paths(model)
    chosen = {path for path, _ in targets}
    out, seen = [], set()
    for path, module in targets:
        paths = aliases.get(id(module), [path])
        missing = [p for p in paths if p not in chosen]
        if missing and not exact:
            raise TargetError(
                f"{path!r} is the same module object as {missing[0]!r} (registered at both); adapting only "
                f"one of them is impossible. Target all of {paths} (the adapter then applies at every use) "
                "or give each place its own module"
            )
        if id(module) not in seen:
            seen.add(id(module))
            out.append((path, module))
    return out


def install(model: nn.Module, path: str, layer: nn.Module) -> None:
    """Put `layer` (an `AdapterLayer`, or a base module when unwrapping) at `path` and at every
    other path where the module now at `path` is registered."""
    current = model.get_submodule(path)
    key = id(current.base_layer) if isinstance(current, AdapterLayer) else id(current)
    paths = module_paths(model).get(key, [path])
    for p in paths:
        parent_path, _, leaf = p.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, layer)


def _alias(t: Tensor) -> tuple:
    """A key two parameter objects share when they alias the same data (same address and shape)."""
    try:
        if t.device.type == "meta" or t.numel() == 0 or t.data_ptr() == 0:
            return ()
        return ("data", str(t.device), t.data_ptr(), tuple(t.shape))
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):  # subclasses without data
        return ()


def require_unshared(model: nn.Module, layers: list[tuple[str, AdapterLayer]]) -> None:
    """Raise `MergeError` before anything is merged if the base weight of one of `layers` is
    also a weight of another module (tied, e.g. `lm_head` and the input embedding)."""
    owners: dict[object, list[str]] = {}
    paths_of: dict[int, list[str]] = {}  # every named_modules path of a module (base layers too)
    for path, module in model.named_modules(remove_duplicate=False):
        paths_of.setdefault(id(module), []).append(path)
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            continue
        for name, p in module.named_parameters(recurse=False):
            for key in (("id", id(p)), _alias(p)):
                if key:
                    owners.setdefault(key, []).append(f"{path}.{name}" if path else name)
    for path, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        if not isinstance(weight, Tensor):
            continue
        mine = {n for n, p in layer.base_layer.named_parameters(recurse=False) if p is weight}
        own_names = {f"{q}.{n}" for q in paths_of.get(id(layer.base_layer), []) for n in mine}
        others = [o for key in (("id", id(weight)), _alias(weight)) if key for o in owners.get(key, [])]
        others = sorted({o for o in others if o not in own_names})
        if others:
            raise MergeError(
                f"the weight of {path!r} is also {others[0]!r} (tied weights, e.g. tie_word_embeddings); "
                f"merging into it would change {others[0]!r} too, so nothing was merged. Keep the adapter "
                f"unmerged, or untie first: model.get_submodule({path!r}).weight = "
                "nn.Parameter(<that weight>.detach().clone()) (and save with tie_word_embeddings=False)"
            )


# -- checkpoints on disk (the CLI's merge and validate) -----------------------------------------
OUTPUT_HEADS = ("lm_head", "embed_out", "output")  # leaf names of heads tie_word_embeddings ties
INPUT_EMBEDDINGS = (
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
)  # ... and the embeddings it ties them to


def checkpoint_config(root: Path) -> dict[str, Any] | None:
    """The checkpoint directory's config.json (read bounded, never blocking), or None when it is
    absent or unreadable."""
    path = root / "config.json"
    try:
        config = json.loads(read_regular(path, "config.json", limit=2**20)) if path.exists() else None
    except (AdapterFileError, ValueError, RecursionError, OSError):  # UnicodeDecodeError is a ValueError
        return None
    return config if isinstance(config, dict) else None


def ties_embeddings(root: Path) -> bool:
    """Whether config.json ties the output head to the input embedding (`tie_word_embeddings`;
    absent means transformers' default, True). No or unreadable config: False."""
    config = checkpoint_config(root)
    return config is not None and config.get("tie_word_embeddings", True) is True


CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")  # transformers' Conv1D users


def linear_transposed(root: Path) -> bool | None:
    """Whether the checkpoint's architecture stores its linear weights (in, out) in transformers'
    Conv1D (GPT-2 and kin), from config.json's model_type; None when unknown."""
    model_type = (checkpoint_config(root) or {}).get("model_type")
    return model_type in CONV1D_MODEL_TYPES if isinstance(model_type, str) else None


def tied_heads(paths: Iterable[str], root: Path) -> list[str]:
    """The adapter module paths that are an output head or an input embedding tied to each other
    in the checkpoint at `root`: the streaming merge refuses them (a merged head or embedding
    would change the shared tensor, and transformers re-ties the head to the embedding on load)."""
    if not ties_embeddings(root):
        return []
    return [p for p in paths if p.rsplit(".", 1)[-1] in OUTPUT_HEADS + INPUT_EMBEDDINGS]
