"""Save and load adapters: `save` / `save_pretrained` write a model's adapter as a directory,
`load` adds one from a directory (ours or PEFT's LoRA). The format and its checks live in
`files/`; docs/architecture.md#files describes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .errors import AdapterFileError
from .experts import ExpertWeights
from .files.adapter_dir import (
    CONFIG_FILE,
    FORMAT_VERSION,
    PREFIX,
    WEIGHTS_FILE,
    directory_files,
    fingerprint,
    metadata_block,
    peft_config,
    read_adapter,
    require_fingerprint_match,
    split_by_module,
)
from .files.atomic import write_dir_atomic, write_files_atomic
from .files.fill import filler
from .model import adapters, apply_plan, deltas, plan, unwrapped
from .targeting import logical_modules, matches

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "PREFIX",
    "WEIGHTS_FILE",
    "adapter_files",
    "load",
    "read_adapter",
    "save",
    "save_pretrained",
]


def save(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to `directory` (created or replaced atomically, one save at a time
    per parent directory); return the path. A DDP / DataParallel wrapper is looked through."""
    return write_dir_atomic(Path(directory), adapter_files(unwrapped(model), name))


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
    if not is_main_process:
        return
    root = Path(save_directory)
    written = [(root if name == "default" else root / name, adapter_files(inner, name)) for name in names]
    for directory, files in written:
        write_files_atomic(directory, files)


def adapter_files(model: nn.Module, name: str) -> dict[str, bytes]:
    """{file name: bytes} of adapter `name`'s directory: the safetensors file and the JSON config."""
    found = deltas(model, name)
    if not found:
        raise AdapterFileError(
            f"no adapter named {name!r} to save; adapters: {sorted(adapters(model)) or 'none'}"
        )
    config = found[0][2].config
    paths = [path for path, _, _ in found]
    tensors = {
        f"{path}.{key}": t.detach().contiguous().cpu()
        for path, _, delta in found
        for key, t in delta.state_dict().items()
    }
    prints = fingerprint(model, paths)
    tensors = {PREFIX + k: t for k, t in config.file_tensors(tensors, prints["modules"]).items()}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return directory_files(
        tensors,
        metadata_block(config, prints),
        peft_config(config, paths, [d for _, _, d in found], name_or_path),
    )


def load(
    model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False
) -> nn.Module:
    """Add the adapter saved in `directory` to `model` as `name` (atomic: on any error the model is
    unchanged). Reads adapterlab directories and PEFT LoRA directories."""
    inner = unwrapped(model)  # a DDP / DataParallel wrapper is looked through
    metadata, tensors = read_adapter(directory)
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
    apply_plan(inner, name, steps, trainable=trainable)
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
