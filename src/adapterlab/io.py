"""Save and load adapters: safetensors + JSON only, atomic directory writes, PEFT interop.

A saved adapter is a directory with two files:
- `adapter_model.safetensors`: tensors keyed `base_model.model.<module path>.<delta key>` (PEFT's
  keys for LoRA); the header metadata holds `adapterlab`, a JSON block with format version, library
  version, method, config, and a fingerprint of the base model's targeted modules;
- `adapter_config.json`: PEFT's `LoraConfig` fields when the adapter is expressible in PEFT (so
  `peft.PeftModel.from_pretrained` loads the directory as is), otherwise the `adapterlab` block.
  PEFT warns about unknown keys in its config, which is why our block does not go there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import AdapterConfig
from .errors import AdapterFileError, AdapterlabError, FingerprintMismatchError
from .layer import Delta
from .methods.lora import LoRAConfig
from .model import adapter_layers, adapters, apply_plan, plan
from .targeting import logical_modules

VERSION = "0.1.0"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PEFT_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "modules_to_save": None, "rank_pattern": {},
                    "alpha_pattern": {}, "layer_replication": None, "target_parameters": None,
                    "trainable_token_indices": None}


# -- fingerprint ----------------------------------------------------------------------------------
def fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """The targeted modules' types and weight shapes, and a hash of them."""
    modules = dict(logical_modules(model))
    info = {p: {"type": type(modules[p]).__name__, "shape": list(modules[p].weight.shape)} for p in sorted(paths)}
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return {"modules": info, "sha256": digest}


def check_fingerprint(model: nn.Module, expected: dict[str, Any]) -> None:
    modules = dict(logical_modules(model))
    problems = []
    for path, want in expected.get("modules", {}).items():
        have = modules.get(path)
        if have is None:
            problems.append(f"{path!r} is missing")
        elif not hasattr(have, "weight") or list(have.weight.shape) != want["shape"]:
            shape = list(have.weight.shape) if hasattr(have, "weight") else None
            problems.append(f"{path!r} has weight shape {shape}, the adapter expects {want['shape']}")
    if problems:
        raise FingerprintMismatchError(
            f"this adapter was made for another base model: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Load it into the model it was trained on")


# -- save -----------------------------------------------------------------------------------------
def _deltas(model: nn.Module, name: str) -> list[tuple[str, Delta]]:
    found = [(path, layer.deltas[name]) for path, layer in adapter_layers(model) if name in layer.deltas]
    if not found:
        raise AdapterFileError(f"no adapter named {name!r} to save; adapters: {sorted(adapters(model)) or 'none'}")
    return found


def _peft_config(model: nn.Module, config: AdapterConfig, deltas: list[tuple[str, Delta]]) -> dict | None:
    """PEFT's LoraConfig fields for this adapter, or None when PEFT cannot express it."""
    if not isinstance(config, LoRAConfig) or not all(getattr(d, "peft_compatible", False) for _, d in deltas):
        return None
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        # a regex PEFT full-matches: exactly these modules (a list would also match dotted suffixes)
        "target_modules": "^(?:" + "|".join(re.escape(p) for p, _ in deltas) + ")$",
        "fan_in_fan_out": any(getattr(d, "transposed", False) for _, d in deltas),
        "bias": "none", "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


def save(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to `directory` (created or replaced atomically); return the path."""
    deltas = _deltas(model, name)
    config = deltas[0][1].config
    tensors = {f"{PREFIX}{path}.{key}": t.detach().contiguous().cpu()
               for path, delta in deltas for key, t in delta.state_dict().items()}
    block = {"format_version": FORMAT_VERSION, "library_version": VERSION, "method": config.method,
             "config": config.to_dict(), "fingerprint": fingerprint(model, [p for p, _ in deltas])}
    json_config = _peft_config(model, config, deltas) or {"adapterlab": block}
    files = {
        WEIGHTS_FILE: safetensors_bytes(tensors, metadata={"adapterlab": json.dumps(block)}),
        CONFIG_FILE: (json.dumps(json_config, indent=2, sort_keys=True) + "\n").encode(),
    }
    return write_dir_atomic(Path(directory), files)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomic(target: Path, files: dict[str, bytes]) -> Path:
    """Fill a sibling temp dir, fsync it, then swap it in with renames: an interrupted write leaves
    either the complete old directory (at `target`, or at `.NAME.old-*` beside it for the instant
    between the two renames) or the complete new one. Other files already in `target` are kept."""
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{str(target)!r} exists and is not a directory; choose a directory path")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        for fname, data in files.items():
            _fsync_write(tmp / fname, data)
        if target.exists():
            for entry in target.iterdir():
                if entry.name not in files:
                    copy = shutil.copytree if entry.is_dir() else shutil.copy2
                    copy(entry, tmp / entry.name)
        _fsync_dir(tmp)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


# -- load -----------------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The `adapterlab` block (made from PEFT's config for PEFT-written dirs) and the tensors.
    Never unpickles; every failure is an `AdapterFileError`."""
    root = Path(directory)
    if not root.is_dir():
        hint = ""
        if root.parent.is_dir() and any(p.name.startswith(f".{root.name}.old-") for p in root.parent.iterdir()):
            hint = f"; an interrupted save left the previous version in {root.parent}/.{root.name}.old-*"
        raise AdapterFileError(f"adapter directory {str(root)!r} does not exist{hint}")
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterFileError(
                f"{str(root)!r} holds only pickle weights {pickles}; adapterlab never unpickles (it can run code). "
                "Convert them with safetensors in a process you trust: "
                "safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')")
        raise AdapterFileError(f"{str(root)!r} has no {WEIGHTS_FILE}; is it an adapter directory?")
    try:
        with safe_open(weights, framework="pt") as f:
            header = (f.metadata() or {}).get("adapterlab")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{str(weights)!r} is not a readable safetensors file ({e}); re-save the adapter") from None
    if header is not None:
        block = _json(header, f"the {WEIGHTS_FILE} header")
    else:
        block = _from_peft(_json_file(root / CONFIG_FILE), root)
    if not isinstance(block, dict) or not isinstance(block.get("format_version"), int):
        raise AdapterFileError(f"{str(root)!r}: the adapterlab metadata has no integer format_version")
    if block["format_version"] > FORMAT_VERSION:
        raise AdapterFileError(
            f"{str(root)!r} has format version {block['format_version']} (written by adapterlab "
            f"{block.get('library_version', '?')}); this adapterlab {VERSION} reads up to {FORMAT_VERSION}. "
            "Upgrade adapterlab")
    return block, tensors


def _json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{where} is not valid JSON ({e}); re-save the adapter") from None


def _json_file(path: Path) -> Any:
    if not path.is_file():
        raise AdapterFileError(f"{str(path)!r} is missing; an adapter directory needs {CONFIG_FILE}")
    return _json(path.read_bytes(), str(path))


def _from_peft(cfg: Any, root: Path) -> dict[str, Any]:
    """Our metadata block for a directory PEFT wrote (LoRA only)."""
    if isinstance(cfg, dict) and isinstance(cfg.get("adapterlab"), dict):
        return cfg["adapterlab"]
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise AdapterFileError(f"{str(root)!r}: cannot read a {kind!r} adapter; adapterlab reads its own "
                               "directories and PEFT LoRA directories")
    used = [k for k, default in PEFT_UNSUPPORTED.items() if cfg.get(k, default) not in (default, None, {}, [], False)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias={cfg['bias']!r}")
    if used:
        raise AdapterFileError(f"{str(root)!r} uses PEFT LoRA features adapterlab does not read: {used}")
    config = {"method": "lora", "r": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
              "dropout": cfg.get("lora_dropout", 0.0), "rslora": bool(cfg.get("use_rslora", False))}
    return {"format_version": FORMAT_VERSION, "library_version": f"peft {cfg.get('peft_version', '?')}",
            "method": "lora", "config": config, "fingerprint": {}}


def _module_paths(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Any) -> list[str]:
    """The module each tensor key belongs to: the longest module path that prefixes it."""
    known = {p for p, _ in logical_modules(model)}
    paths = set()
    for key in tensors:
        parts = key[len(PREFIX):].split(".") if key.startswith(PREFIX) else []
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in known), None)
        if owner is None:
            raise AdapterFileError(f"{str(directory)!r}: tensor {key!r} belongs to no module of this model "
                                   f"(keys look like '{PREFIX}<module path>.<param>'); load it into the model it was made for")
        paths.add(owner)
    if not paths:
        raise AdapterFileError(f"{str(directory)!r} holds no tensors")
    return sorted(paths)


def _loaded_delta(config: AdapterConfig, path: str, module: nn.Module, built: Delta,
                  tensors: dict[str, torch.Tensor], directory: Any) -> Delta:
    """`config.loaded_delta` with this module's tensors (keys relative to the module)."""
    prefix = f"{PREFIX}{path}."
    own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
    try:
        return config.loaded_delta(module, built, own)
    except AdapterlabError as e:
        raise AdapterFileError(f"{str(directory)!r} does not fit {path!r}: {e}") from None


def load(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False) -> nn.Module:
    """Add the adapter saved in `directory` to `model` as `name` (atomic: on any error the model is
    unchanged). Reads adapterlab directories and PEFT LoRA directories."""
    block, tensors = read_adapter(directory)
    if block.get("method") == "levi":
        raise AdapterFileError(f"{str(directory)!r} holds a LEVI side network, not weight deltas; "
                               "load it with al.levi.load(backbone, directory)")
    config = AdapterConfig.from_dict(block.get("config"))
    check_fingerprint(model, block.get("fingerprint") or {})
    steps = [(path, module, _loaded_delta(config, path, module, delta, tensors, directory))
             for path, module, delta in plan(model, config, name, paths=_module_paths(model, tensors, directory))]
    expected = {f"{PREFIX}{path}.{key}": (delta, key) for path, _, delta in steps
                for key in delta.state_dict()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{str(directory)!r} does not fit this model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    for key, (delta, local) in expected.items():
        target, given = delta.state_dict()[local], tensors[key]
        if given.shape != target.shape or given.is_floating_point() != target.is_floating_point():
            raise AdapterFileError(f"{str(directory)!r}: tensor {key!r} has shape {list(given.shape)} "
                                   f"and dtype {given.dtype}; this model needs shape {list(target.shape)} "
                                   f"({target.dtype})")
    with torch.no_grad():
        for key, (delta, local) in expected.items():
            delta.state_dict()[local].copy_(tensors[key])
    apply_plan(model, name, steps, trainable=trainable)
    return model
