"""Save and load adapters: `save` / `save_pretrained` write a model's adapter as a directory,
`load` adds one from a directory (ours or PEFT's LoRA). The format and its checks live in
`files/`; docs/architecture.md#files describes them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import running_stats
from .config import AdapterConfig
from .dtensors import is_dtensor, whole, writer_rank
from .errors import AdapterFileError, ConfigError
from .experts import ExpertWeights
from .files.adapter_dir import (
    CONFIG_FILE,
    FORMAT_VERSION,
    PREFIX,
    WEIGHTS_FILE,
    directory_files,
    metadata_block,
    peft_config,
    read_adapter,
    split_by_module,
)
from .files.atomic import write_dir_atomic, write_files_atomic
from .files.diffusers_dir import WEIGHTS_FILE as DIFFUSERS_FILE
from .files.diffusers_dir import diffusers_files
from .files.fill import filler
from .files.fingerprint import fingerprint, require_fingerprint_match
from .model import adapters, apply_plan, deltas, plan, unwrapped
from .targeting import logical_modules, matches

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "PREFIX",
    "WEIGHTS_FILE",
    "adapter_files",
    "diffusers_adapter_files",
    "load",
    "read_adapter",
    "save",
    "save_pretrained",
]


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    *,
    format: str = "adapterlab",
    prefix: str | None = None,
) -> Path:
    """Write adapter `name` to `directory` (created or replaced atomically, one save at a time
    per parent directory); return the path. A DDP / DataParallel wrapper is looked through.

    `format="adapterlab"` (default): adapter_model.safetensors + adapter_config.json (PEFT's
    LoraConfig where PEFT can express the adapter). `format="diffusers"` (LoRA only): diffusers'
    pytorch_lora_weights.safetensors with the LoraConfig in its header, so
    `unet.load_lora_adapter(directory, prefix=None, use_safetensors=True)` loads it with this exact
    α/r; with `prefix="unet"` (or "transformer") keys and config sit under that component, as a
    pipeline's `save_lora_weights` writes them, for `pipe.load_lora_weights(directory)`.
    `al.load` reads both. docs/diffusers.md.

    On a model sharded by FSDP2 (`fully_shard`; DTensor adapter tensors) every rank must call
    `save`: the adapter's tensors are gathered (a collective), then rank 0 writes and the other
    ranks return without writing (and without waiting for the write). docs/distributed.md#fsdp2."""
    inner = unwrapped(model)
    if format not in ("adapterlab", "diffusers"):
        raise ConfigError(f"format={format!r}; use 'adapterlab' (the default) or 'diffusers'")
    if format == "adapterlab" and prefix is not None:
        raise ConfigError(f"prefix={prefix!r} is for format='diffusers'; drop it or pass that format")
    sharded = any(is_dtensor(t) for _, _, d in deltas(inner, name) for t in d.state_dict().values())
    if format == "adapterlab":
        files, replaces = adapter_files(inner, name), frozenset({DIFFUSERS_FILE})
    else:
        files, replaces = diffusers_adapter_files(inner, name, prefix), frozenset({WEIGHTS_FILE, CONFIG_FILE})
    if sharded and not writer_rank():
        return Path(directory)
    return write_dir_atomic(Path(directory), files, replaces=replaces)


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True, **ignored: Any
) -> None:
    """`model.save_pretrained(dir)` (and so `Trainer.save_model`) on a Hugging Face model with
    adapters: writes the adapters, as PEFT lays them out — "default" in `dir` itself, any other
    adapter in `dir/<name>/` — and no base weights and no config.json, so a plain
    `from_pretrained(dir)` can never build a model whose adapted weights are random. Reload with
    `al.load(AutoModel….from_pretrained(base), dir)` (or PEFT's, for LoRA). Each file is replaced
    atomically; other files in `dir` are left alone. Without adapters: the model's own method.

    The other keyword arguments of transformers' method (`state_dict`, `safe_serialization`,
    `max_shard_size`, …) concern the full checkpoint and are ignored."""
    inner = unwrapped(model)
    names = list(adapters(inner))
    if not names:
        # a transformers model (save_pretrained is installed on those only)
        type(inner).save_pretrained(  # type: ignore[attr-defined]
            inner, save_directory, is_main_process=is_main_process, **ignored
        )
        return
    root = Path(save_directory)  # gathered on every rank first: under FSDP2 that is a collective
    written = [(root if name == "default" else root / name, adapter_files(inner, name)) for name in names]
    if not is_main_process:
        return
    for directory, files in written:
        write_files_atomic(directory, files)


def adapter_files(model: nn.Module, name: str) -> dict[str, bytes]:
    """{file name: bytes} of adapter `name`'s directory: the safetensors file and the JSON config.
    The running statistics that changed since the adapter was added are stored with it."""
    config, tensors, block, peft = _adapter_parts(model, name, with_stats=True)
    return directory_files({PREFIX + k: t for k, t in tensors.items()}, block, peft)


def diffusers_adapter_files(model: nn.Module, name: str, prefix: str | None = None) -> dict[str, bytes]:
    """{file name: bytes} of adapter `name` as diffusers' LoRA file (see `save`). Running
    statistics (BatchNorm) have no place in diffusers' format: they are left out, with a warning."""
    config, tensors, block, peft = _adapter_parts(model, name, with_stats=False)
    if peft is None:
        raise ConfigError(
            f"adapter {name!r} {config.peft_refusal()}; diffusers loads LoRA in PEFT's layout only. "
            "Save it with format='adapterlab' and merge it into the model (al.merge, adapterlab merge)"
        )
    moved = running_stats.changed(model, name)
    if moved:
        warnings.warn(
            f"format='diffusers' cannot store the running statistics that moved in training "
            f"({', '.join(sorted(moved)[:3])}{', …' if len(moved) > 3 else ''}); save with "
            "format='adapterlab' to keep them",
            stacklevel=3,
        )
    return diffusers_files(tensors, peft, {"adapterlab": json.dumps(block)}, prefix)


def _adapter_parts(
    model: nn.Module, name: str, with_stats: bool
) -> tuple[AdapterConfig, dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """Adapter `name`'s config, its tensors in the file's layout keyed `<path>.<key>` (with the
    running statistics that moved, if `with_stats`), our metadata block and PEFT's config (None
    where PEFT cannot express the adapter)."""
    found = deltas(model, name)
    if not found:
        raise AdapterFileError(
            f"no adapter named {name!r} to save; adapters: {sorted(adapters(model)) or 'none'}"
        )
    config = found[0][2].config
    paths = [path for path, _, _ in found]
    tensors = {  # DTensor shards (FSDP2) gathered whole: every rank, same order (deltas' order)
        f"{path}.{key}": whole(t).detach().contiguous().cpu()
        for path, _, delta in found
        for key, t in delta.state_dict().items()
    }
    prints = fingerprint(model, paths)
    tensors = config.file_tensors(tensors, prints["modules"])
    stats = running_stats.changed(model, name) if with_stats else {}
    tensors.update(stats)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name_or_path is not None:  # diffusers' from_pretrained keeps the Path it was given
        name_or_path = str(name_or_path)
    peft = peft_config(config, paths, [d for _, _, d in found], name_or_path)
    return config, tensors, metadata_block(config, prints, list(stats)), peft


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    trainable: bool = False,
    *,
    component: str | None = None,
) -> nn.Module:
    """Add the adapter saved in `directory` to `model` as `name` (atomic: on any error the model is
    unchanged). Reads adapterlab directories, PEFT LoRA directories and diffusers' LoRA files
    (`save_lora_adapter`'s, or a pipeline's `save_lora_weights`', whose `component` — "unet",
    "transformer", … — is chosen by name when the file holds several). Running statistics saved
    with the adapter are written into the model's buffers."""
    inner = unwrapped(model)  # a DDP / DataParallel wrapper is looked through
    metadata, tensors = read_adapter(directory, component)
    config = AdapterConfig.from_dict(metadata["config"])  # validated by read_adapter
    if config.side_network:
        raise AdapterFileError(
            f"{str(directory)!r} holds a {config.method.upper()} side network, not weight "
            f"deltas; load it with al.{config.method}.load(backbone, directory)"
        )
    require_fingerprint_match(inner, metadata["fingerprint"])
    where = repr(str(directory))
    if not metadata["fingerprint"]:  # PEFT's: expert-weight factors (target_parameters) need the model's
        tensors = _native_peft(inner, config, _peft_base_weights(inner, tensors, where), where)
    owned = split_by_module(
        tensors,
        {p for p, _ in logical_modules(inner)},
        where,
        "this model; load it into the model it was made for",
    )
    steps = plan(
        inner,
        config,
        name,
        paths=list(owned),
        build=filler(config, owned, lambda path: f"{where}: module {path!r}"),
    )
    if not metadata["fingerprint"]:  # PEFT's file: its layout must be the one our delta computes
        odd = [path for path, _, delta in steps if not getattr(delta, "peft_compatible", True)]
        if odd:
            raise AdapterFileError(
                f"{where}: PEFT computes the LoRA of {odd[:3]} differently from adapterlab (a conv with groups, "
                "dilation or a padding mode other than zeros: PEFT's lora_A ignores them), so its outputs "
                "cannot be reproduced; adapterlab refuses it rather than load another adapter"
            )
    running_stats.check(inner, metadata["buffers"], where)
    apply_plan(inner, name, steps, trainable=trainable)
    running_stats.write(inner, metadata["buffers"])
    return model


def _native_peft(model: nn.Module, config: AdapterConfig, tensors: dict[str, Tensor], where: str) -> dict:
    """A PEFT file's tensors in our layout: expert weights its config names are found in the model."""
    spec = config.targets if isinstance(config.targets, list) else []
    experts = [
        p for p, m in logical_modules(model) if isinstance(m, ExpertWeights) and matches(p, m, spec, None)
    ]
    if not experts:
        return tensors
    local = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: t for k, t in tensors.items()}
    native = type(config).native_tensors(local, fingerprint(model, experts)["modules"], where)
    return {PREFIX + k: t for k, t in native.items()}


def _peft_base_weights(model: nn.Module, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """PEFT saves the base weight of an adapted embedding beside its factors (`<path>.base_layer.weight`,
    its `save_embedding_layers`, for resized vocabularies) and loads it into the model. Equal to the
    model's, it is dropped; otherwise loading would change the base model, and it is refused."""
    modules = dict(logical_modules(model))
    kept = {}
    for key, t in tensors.items():
        path = (
            key[len(PREFIX) :].removesuffix(".base_layer.weight")
            if key.endswith(".base_layer.weight")
            else None
        )
        if path is None:
            kept[key] = t
            continue
        weight = getattr(modules.get(path), "weight", None)
        if not (
            isinstance(weight, Tensor)
            and weight.shape == t.shape
            and torch.equal(weight.detach().cpu(), t.to(weight.dtype))
        ):
            raise AdapterFileError(
                f"{where}: {key!r} is a base weight PEFT saved with the adapter (save_embedding_layers) and it "
                f"differs from the model's {path!r} (a resized or retrained embedding?); adapterlab never "
                "changes base weights on load: load it into the model whose embedding it saved"
            )
    return kept
