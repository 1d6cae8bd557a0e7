"""diffusers' LoRA files, both ways: `pytorch_lora_weights.safetensors` as `save_lora_adapter`
(module-path keys) and a pipeline's `save_lora_weights` (keys and config fields under a component
prefix, `unet.` / `transformer.` / `text_encoder.`) write it. The LoRA config is PEFT's `LoraConfig`
as JSON in the header metadata (`lora_adapter_metadata`, what `load_lora_adapter` builds its
`LoraConfig` from, so α/r is exact); files without it carry per-module network alphas
(`<module>.alpha` scalars) or nothing (α = r). docs/diffusers.md.

This module knows the container only; what the keys mean is the config class's (`peft_inferred`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import AdapterFileError
from ..targeting import module_path_ok
from ..text import excerpt
from .fs import is_regular
from .safetensors import encode, parse_json, read_header, read_tensors

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
# the pipeline components diffusers' save_lora_weights prefixes keys with
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
ALPHA_SUFFIX = ".alpha"


def is_diffusers_dir(root: Path) -> bool:
    """`root` holds diffusers' LoRA weights file (and so is read as diffusers')."""
    return os.path.lexists(root / WEIGHTS_FILE)


def diffusers_files(
    tensors: dict[str, Tensor], peft: dict[str, Any], header: dict[str, str], prefix: str | None
) -> dict[str, bytes]:
    """{WEIGHTS_FILE: bytes}: `tensors` (keyed `<module path>.<key>`) and PEFT's LoraConfig fields
    `peft` as `lora_adapter_metadata`, both under `prefix.` when given (a pipeline's layout, for
    `pipe.load_lora_weights`); `header` holds further metadata (our block)."""
    if prefix is not None and not (isinstance(prefix, str) and prefix and module_path_ok(prefix)):
        raise AdapterFileError(
            f"prefix={excerpt(prefix, 50)} is not a component name; use the pipeline component the "
            "adapter is for, e.g. 'unet' or 'transformer', or None for load_lora_adapter's layout"
        )
    lead = f"{prefix}." if prefix else ""
    fields = {lead + k: v for k, v in peft.items()}
    metadata = {**header, "format": "pt", METADATA_KEY: json.dumps(fields, indent=2, sort_keys=True)}
    return {WEIGHTS_FILE: encode({lead + k: t for k, t in tensors.items()}, metadata)}


@dataclass
class DiffusersFile:
    """One component's LoRA read from a diffusers file, keys relative to the component's model."""

    header: dict[str, str]  # the safetensors metadata (our block under "adapterlab", if written by us)
    tensors: dict[str, Tensor]  # <module path>.<key>, network alphas removed
    peft: dict[str, Any] | None  # LoraConfig fields from lora_adapter_metadata, if the file has them
    alphas: dict[str, float] = field(default_factory=dict)  # module path -> network alpha
    component: str | None = None  # the key prefix that was removed


def read_diffusers(root: Path, component: str | None = None) -> DiffusersFile:
    """The LoRA of `component` (or of the file's only component, or of an unprefixed file) in
    `root`'s diffusers weights file. Several components and none chosen, or one the file lacks,
    are `AdapterFileError`s naming those it has."""
    path = root / WEIGHTS_FILE
    tensors, header = read_tensors(path)
    where = repr(str(path))
    chosen = _component(list(tensors), header, component, where)
    lead = f"{chosen}." if chosen else ""
    tensors = {k[len(lead) :]: t for k, t in tensors.items() if k.startswith(lead)}
    peft = _peft_fields(header, lead, where)
    alphas: dict[str, float] = {}
    for key in [k for k in tensors if k.endswith(ALPHA_SUFFIX)]:
        t = tensors.pop(key)
        value = float(t.double().reshape(-1)[0]) if t.numel() == 1 and t.is_floating_point() else math.nan
        if not (math.isfinite(value) and value > 0):
            raise AdapterFileError(
                f"{where}: network alpha {key!r} is not one positive finite number (shape "
                f"{list(t.shape)}, dtype {t.dtype}); the file is corrupt"
            )
        alphas[key[: -len(ALPHA_SUFFIX)]] = value
    if not tensors:
        raise AdapterFileError(f"{where} holds no LoRA tensors{f' for {chosen!r}' if chosen else ''}")
    return DiffusersFile(header, tensors, peft, alphas, chosen)


def peft_fields(root: Path, component: str | None = None) -> dict[str, Any] | None:
    """The LoraConfig fields of `root`'s diffusers file (header only), or None without them."""
    path = root / WEIGHTS_FILE
    if not is_regular(path):
        return None
    infos, header = read_header(path)
    chosen = _component(list(infos), header, component, repr(str(path)))
    return _peft_fields(header, f"{chosen}." if chosen else "", repr(str(path)))


def _component(keys: list[str], header: dict[str, str], component: str | None, where: str) -> str | None:
    """The component prefix to read: None for a file whose keys are module paths (its
    lora_adapter_metadata, if any, has unprefixed fields: a GPT-2's `transformer.h.0…` stays whole)."""
    firsts = {k.split(".", 1)[0] for k in keys}
    fields = _peft_fields(header, "", where) or {}
    if "r" in fields or "peft_type" in fields:
        return None  # LoraConfig fields without a component prefix: save_lora_adapter's layout
    if not firsts or not firsts <= set(COMPONENTS):
        return None  # keys are module paths (save_lora_adapter's layout)
    if component is None:
        if len(firsts) > 1:
            raise AdapterFileError(
                f"{where} holds LoRA for the pipeline components {sorted(firsts)}; adapterlab loads one "
                f"model's adapter: choose one, e.g. al.load(unet, dir, component={sorted(firsts)[-1]!r})"
            )
        return next(iter(firsts))
    if component not in firsts:
        raise AdapterFileError(
            f"{where} has no LoRA for component {excerpt(component, 50)}; it holds {sorted(firsts)}"
        )
    return component


def _peft_fields(header: dict[str, str], lead: str, where: str) -> dict[str, Any] | None:
    """lora_adapter_metadata's fields under `lead` (the component prefix), or None if absent."""
    text = header.get(METADATA_KEY)
    if text is None:
        return None
    data = parse_json(text, f"{where}: {METADATA_KEY}")
    if not isinstance(data, dict):
        raise AdapterFileError(f"{where}: {METADATA_KEY} is {excerpt(data, 80)}, not a JSON object")
    fields = {k[len(lead) :]: v for k, v in data.items() if k.startswith(lead)}
    return fields or None
