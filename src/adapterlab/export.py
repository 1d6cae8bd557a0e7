"""`adapterlab export`: an adapter as PEFT's LoRA directory, as diffusers' LoRA file, or as one
safetensors file of dense ΔW per module (any per-module method). docs/cli.md#export.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import AdapterFileError, ConfigError
from .files.adapter_dir import CONFIG_FILE, PREFIX, WEIGHTS_FILE, AdapterFile
from .files.atomic import write_dir_atomic, write_file_atomic
from .files.diffusers_dir import WEIGHTS_FILE as DIFFUSERS_FILE
from .files.diffusers_dir import diffusers_files
from .files.fs import check_output, read_regular, storage_errors
from .files.safetensors import DTYPE_NAMES, SafetensorsWriter, encode
from .skeleton import require_memory, skeleton, zeros
from .text import excerpt


def export_peft(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """PEFT's LoRA layout (adapter_config.json as peft's LoraConfig + adapter_model.safetensors),
    loadable with `peft.PeftModel.from_pretrained`; refuses adapters PEFT cannot express, and an
    `out` that is, contains or lies inside the adapter, or is not a directory."""
    check_output(out, [directory])
    adapter = AdapterFile.open(directory)
    if adapter.peft_config is None:
        raise ConfigError(f"{adapter.name!r} {adapter.config.peft_refusal()}. Use --format dense for its ΔW")
    weights = adapter.directory / WEIGHTS_FILE
    files = {
        CONFIG_FILE: (json.dumps(adapter.peft_config, indent=2, sort_keys=True) + "\n").encode(),
        WEIGHTS_FILE: read_regular(weights, "adapter weights file", limit=None)
        if weights.exists()  # else a diffusers file: its tensors under PEFT's prefix
        else encode(
            {PREFIX + k: t for k, t in _file_tensors(adapter).items()},
            {"adapterlab": json.dumps(adapter.block)},
        ),
    }
    return write_dir_atomic(Path(out), files, replaces=frozenset({DIFFUSERS_FILE}))


def export_diffusers(directory: str | os.PathLike, out: str | os.PathLike, prefix: str | None = None) -> Path:
    """diffusers' LoRA file (pytorch_lora_weights.safetensors, the LoraConfig in its header) in
    directory `out`: `load_lora_adapter(out, prefix=None, use_safetensors=True)` loads it; with
    `prefix` ("unet", "transformer") keys sit under that component, for `pipe.load_lora_weights(out)`.
    LoRA only; the same refusals and `out` checks as `export_peft`. docs/diffusers.md."""
    check_output(out, [directory])
    adapter = AdapterFile.open(directory)
    if adapter.peft_config is None:
        raise ConfigError(
            f"{adapter.name!r} {adapter.config.peft_refusal()}; diffusers loads LoRA in PEFT's layout only. "
            "Merge it into the model instead (adapterlab merge), or use --format dense for its ΔW"
        )
    files = diffusers_files(
        _file_tensors(adapter), adapter.peft_config, {"adapterlab": json.dumps(adapter.block)}, prefix
    )
    return write_dir_atomic(Path(out), files, replaces=frozenset({WEIGHTS_FILE, CONFIG_FILE}))


def _file_tensors(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """The adapter's tensors in its file layout (PEFT's for expert weights), keyed `<path>.<key>`."""
    local = {k[len(PREFIX) :]: t for k, t in adapter.tensors.items()}
    return adapter.config.file_tensors(local, adapter.modules)


def export_dense(
    directory: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None
) -> Path:
    """One safetensors file: per target module `<path>.weight` = its scaled ΔW in the base weight's
    layout (merged weight = W + ΔW); the header metadata holds the adapter's block. Any method but LEVI.
    With `base` (a checkpoint directory), each ΔW is named by the checkpoint key it adds to, as
    `adapterlab merge` maps it (docs/cli.md#checkpoint-keys-and-module-paths).
    `out` must be a regular file or nothing (not a device node or a FIFO), outside the adapter."""
    target = Path(out)
    if target.is_dir():
        raise ConfigError(
            f"--out {str(target)!r} is a directory; --format dense writes one file, e.g. delta.safetensors"
        )
    check_output(target, [directory, *([base] if base is not None else [])], is_file=True)
    adapter = AdapterFile.open(directory)
    adapter.require_deltas("exported as a dense ΔW")
    dtype = adapter.dtype
    paths = list(adapter.modules)
    names = {p: f"{p}.weight" for p in paths} if base is None else _checkpoint_keys(adapter, base)
    layout = [(names[p], DTYPE_NAMES[dtype], adapter.modules[p]["shape"]) for p in paths]
    metadata = {"kind": "dense_delta", "source": str(adapter.directory), **adapter.block}
    largest = max((adapter.modules[p]["shape"] for p in paths), key=math.prod, default=[0])
    require_memory([largest], dtype, f"exporting {adapter.name!r} as dense ΔW")
    with storage_errors(target, "write"):
        target.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        with SafetensorsWriter(tmp, layout, {"format": "pt", "adapterlab": json.dumps(metadata)}) as writer:
            for path, (key, _, shape) in zip(paths, layout, strict=True):
                module = skeleton(adapter.modules[path], zeros(shape, dtype))
                dw = adapter.delta(path, module).delta_weight().detach().to(dtype)
                if not bool(torch.isfinite(dw).all()):
                    raise AdapterFileError(
                        f"{adapter.name!r}: the ΔW of module {excerpt(path)} holds NaN/Inf (huge alpha or "
                        "factors?); nothing was written. Check it with adapterlab validate"
                    )
                writer.write(key, dw)
                del dw
            writer.close()

    return write_file_atomic(target, fill)


def _checkpoint_keys(adapter: AdapterFile, base: str | os.PathLike) -> dict[str, str]:
    """{module path: the key of `base` its ΔW adds to}; an error when one has no key of its own."""
    from .files.checkpoint_dir import open_checkpoint
    from .locate import locate_adapter

    keys = locate_adapter(adapter, open_checkpoint(base))
    apart = [p for p in adapter.modules if p not in keys]
    if apart:
        raise ConfigError(
            f"{excerpt(apart[0])} is saved per expert in {str(base)!r}, not as one weight; export "
            "without --base (its ΔW is then keyed by module path)"
        )
    return keys
