"""The names a checkpoint's tensors get when `from_pretrained` loads them. transformers 5 renames
some models' weights at load (ViT's `encoder.layer.0.attention.attention.query.weight` is loaded
as `layers.0.attention.q_proj.weight`) and writes the old names back on `save_pretrained`, so an
adapter trained on the loaded model names modules the checkpoint on disk does not have. Here the
checkpoint's keys go through transformers' own conversion mapping, exactly as `from_pretrained`
would apply it to that checkpoint's architecture (built on the meta device: no memory, no
weights), so `locate.py` can match adapter paths against loaded names and write back to the
checkpoint's keys. docs/cli.md#checkpoint-keys-and-module-paths.

A key that a `WeightConverter` builds (split, fused, stacked, transposed tensors) is not a rename:
merging into it would need the conversion inverted, so it is reported with its conversion and
never written. Without transformers' conversion API (transformers 4), for custom code (`auto_map`,
which transformers does not convert either) or a config.json transformers cannot build, every key
keeps its own name.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .sharing import checkpoint_config

MODULES_PER_KEY = 8  # a model skeleton may register this many modules per checkpoint tensor (+256)


@dataclass
class KeyMap:
    """The checkpoint's keys by the name the model loads each as."""

    names: dict[str, str] = field(default_factory=dict)  # loaded name -> checkpoint key (renamed or not)
    converted: dict[str, str] = field(default_factory=dict)  # loaded name -> the conversion that builds it
    clashes: dict[str, list[str]] = field(default_factory=dict)  # loaded name -> several checkpoint keys

    @classmethod
    def identity(cls, keys: Iterable[str]) -> KeyMap:
        """Every key loaded under its own name."""
        return cls(names={k: k for k in keys})


def key_map(root: Path, keys: Iterable[str]) -> KeyMap:
    """The `KeyMap` of the checkpoint at `root` whose tensors are `keys`: transformers' load-time
    conversion for the architecture config.json names, or the identity when there is none."""
    keys = tuple(sorted(keys))
    config = checkpoint_config(root)
    if config is None or not isinstance(config.get("model_type"), str):
        return KeyMap.identity(keys)
    return _cached(json.dumps(config, sort_keys=True), keys)


@lru_cache(maxsize=4)
def _cached(config_json: str, keys: tuple[str, ...]) -> KeyMap:
    """One meta-device build per (config, keys): merge asks once per adapter."""
    with _quiet_stderr():  # importing transformers' models imports optional backends, some noisy
        conversions = _conversions(json.loads(config_json), len(keys))
    if conversions is None:
        return KeyMap.identity(keys)
    return _apply(keys, *conversions)


class _TooLarge(Exception):
    """The skeleton registers more modules than the checkpoint's size allows (a hostile config)."""


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null meanwhile: transformers' model modules import the optional
    backends installed beside them (torchao, …), which may print load failures and deprecation
    lines that are not this command's output. Exceptions still propagate (printed after)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _conversions(config: dict[str, Any], n_keys: int) -> tuple[Any, ...] | None:
    """(renamings, converters, base_model_prefix, loaded state-dict keys, dot_natural_key, rename)
    from transformers for the architecture `config` describes, or None (no conversion API, an
    unknown or custom architecture, a config transformers refuses, a skeleton out of proportion
    to the checkpoint)."""
    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # transformers < 5: no load-time renaming of this kind
        return None
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING or "auto_map" in config:
        return None  # transformers gives custom code (auto_map) no conversion; it is never run here
    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    model_class = getattr(transformers, name, None) if name else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        model_class = None  # no or an unknown architecture: AutoModel's class for the model type
    limit = MODULES_PER_KEY * n_keys + 256
    count = 0

    def bounded(module: nn.Module, name: str, sub: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooLarge

    hook = nn.modules.module.register_module_module_registration_hook(bounded)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            built = CONFIG_MAPPING[model_type].from_dict(config)
            model = (
                model_class._from_config(built)
                if model_class is not None
                else transformers.AutoModel.from_config(built)
            )
        mapping = get_model_conversion_mapping(model)
    except Exception:  # _TooLarge, or transformers could not build it (so from_pretrained could not load it)
        return None
    finally:
        hook.remove()
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None
    loaded = dict.fromkeys(model.state_dict())
    return renamings, converters, model.base_model_prefix, loaded, dot_natural_key, rename_source_key


def _apply(
    keys: tuple[str, ...],
    renamings: list[Any],
    converters: list[Any],
    prefix: str,
    loaded: dict[str, None],
    natural: Any,
    rename: Any,
) -> KeyMap:
    """Each key renamed as `from_pretrained` renames it (in its order: renamings may keep state),
    with its fallback to the key itself when only that is a parameter of the model."""
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out = KeyMap()
    seen: dict[str, list[str]] = {}
    for key in sorted(keys, key=natural):
        name, pattern = rename(key, renamings, converters, prefix, loaded)
        if name not in loaded and key in loaded:
            name, pattern = key, None
        if pattern is None:
            seen.setdefault(name, []).append(key)
            continue
        converter = by_pattern[pattern]
        first = converter.target_patterns[0]
        head, _, tail = name.partition(first)
        ops = ", ".join(repr(op) for op in getattr(converter, "operations", []))
        for target in converter.target_patterns:
            built = head + target + tail if first in name else name
            out.converted.setdefault(built, f"{ops or type(converter).__name__} of {key!r}")
    for name, found in seen.items():
        if len(found) == 1:
            out.names[name] = found[0]
        else:
            out.clashes[name] = found
    return out
