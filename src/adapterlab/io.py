"""Save and load adapters: safetensors + JSON only, atomic directory writes, PEFT interop.

A saved adapter is a directory with two files:
- `adapter_model.safetensors`: tensors keyed `base_model.model.<module path>.<delta key>` (PEFT's
  keys for LoRA); the header metadata holds `adapterlab`, a JSON block with format version, library
  version, method, config, and a fingerprint of the base model's targeted modules;
- `adapter_config.json`: PEFT's `LoraConfig` fields when the adapter is expressible in PEFT (so
  `peft.PeftModel.from_pretrained` loads the directory as is), otherwise the `adapterlab` block.
  PEFT warns about unknown keys in its config, which is why our block does not go there.

Files are untrusted input: loading never unpickles, checks every size a safetensors header
declares against the file before reading, and checks the JSON field by field (see `read_adapter`).
Writes are atomic and take turns (see `write_dir_atomic`); docs/reliability.md has the tests.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import quant
from .config import AdapterConfig
from .errors import AdapterFileError, AdapterlabError, FingerprintMismatchError
from .layer import Delta
from .methods.lora import LoRAConfig
from .model import adapter_layers, adapters, apply_plan, plan, unwrapped
from .targeting import is_conv, logical_modules

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
    info = {p: _module_info(modules[p]) for p in sorted(paths)}
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return {"modules": info, "sha256": digest}


def _module_info(module: nn.Module) -> dict[str, Any]:
    """Type and weight shape; a conv with groups != 1 also records them (the shape alone does not
    give the input channels). Modules without groups keep the old entry, so old hashes hold.
    A quantized Linear is recorded as the Linear it stands for (its logical shape), so an adapter
    trained on a 4-bit base fits the full-precision model too."""
    if quant.is_quantized(module):
        return {"type": "Linear", "shape": list(quant.logical_shape(module))}
    info = {"type": type(module).__name__, "shape": list(module.weight.shape)}
    if is_conv(module) and module.groups != 1:
        info["groups"] = module.groups
    return info


def check_fingerprint(model: nn.Module, expected: dict[str, Any]) -> None:
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
    """Write adapter `name` to `directory` (created or replaced atomically, one save at a time
    per parent directory); return the path. A DDP / DataParallel wrapper is looked through."""
    return write_dir_atomic(Path(directory), adapter_files(unwrapped(model), name))


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    **ignored: Any) -> None:
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
        type(inner).save_pretrained(inner, save_directory, is_main_process=is_main_process, **ignored)
        return
    if not is_main_process:
        return
    root = Path(save_directory)
    written = [(root if name == "default" else root / name, adapter_files(inner, name)) for name in names]
    for directory, files in written:
        write_files_atomic(directory, files)


def adapter_files(model: nn.Module, name: str) -> dict[str, bytes]:
    """{file name: bytes} of adapter `name`'s directory: the safetensors file and the JSON config."""
    deltas = _deltas(model, name)
    config = deltas[0][1].config
    tensors = {f"{PREFIX}{path}.{key}": t.detach().contiguous().cpu()
               for path, delta in deltas for key, t in delta.state_dict().items()}
    block = {"format_version": FORMAT_VERSION, "library_version": VERSION, "method": config.method,
             "config": config.to_dict(), "fingerprint": fingerprint(model, [p for p, _ in deltas])}
    json_config = _peft_config(model, config, deltas) or {"adapterlab": block}
    return {
        WEIGHTS_FILE: safetensors_bytes(tensors, metadata={"adapterlab": json.dumps(block)}),
        CONFIG_FILE: (json.dumps(json_config, indent=2, sort_keys=True) + "\n").encode(),
    }


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so the renames inside it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(parent: Path, shared: bool = False) -> Iterator[None]:
    """A `flock` on the directory `parent`: exclusive for a save, shared for a read, so a read
    never sees a save's swap half done. Locking the directory itself leaves no lock file behind;
    the kernel releases the lock if the process dies. Where the directory cannot be opened or the
    file system has no flock, it goes on unlocked."""
    try:
        fd: int | None = os.open(parent, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the lock


def _flock(fd: int, how: int) -> None:
    try:
        fcntl.flock(fd, how)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):  # no flock here (e.g. NFS)
            raise


def _leftovers(target: Path) -> tuple[list[Path], list[Path]]:
    """The `.NAME.tmp-*` and `.NAME.old-*` siblings an interrupted save of `target` left."""
    tmp, old = f".{target.name}.tmp-", f".{target.name}.old-"
    entries = list(target.parent.iterdir())
    return [p for p in entries if p.name.startswith(tmp)], [p for p in entries if p.name.startswith(old)]


def _recover(target: Path) -> None:
    """Called under the lock, so no other save is running: siblings left by an interrupted save
    are garbage, except that if it stopped between its two renames the complete old version at
    `.NAME.old-*` goes back in place first."""
    tmps, olds = _leftovers(target)
    if olds and not target.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, target)
        olds.remove(newest)
    for path in tmps + olds:
        shutil.rmtree(path, ignore_errors=True)


def write_dir_atomic(target: Path, files: dict[str, bytes]) -> Path:
    """Fill a sibling temp dir, fsync it, then swap it in with renames: an interrupted write leaves
    either the complete old directory (at `target`, or at `.NAME.old-*` beside it for the instant
    between the two renames) or the complete new one. Other files already in `target` are kept.

    Concurrent writers (threads or processes) take turns: the whole write holds an exclusive
    `flock` on the parent directory, so the result is one writer's complete directory (the last
    one's). Under the lock, leftovers of an interrupted save are cleaned up (see `_recover`)."""
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{str(target)!r} exists and is not a directory; choose a directory path")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent):
        _recover(target)
        _swap_in(target, files)
    return target


def write_files_atomic(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `directory` (created if missing), each through a fsync'd temp file and a
    rename, so a reader sees every file whole, old or new; the directory's other entries stay."""
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"{str(directory)!r} exists and is not a directory; choose a directory path")
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory.parent):
        for fname, data in files.items():
            tmp = directory / f".{fname}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                _fsync_write(tmp, data)
                os.replace(tmp, directory / fname)
            finally:
                tmp.unlink(missing_ok=True)
        fsync_path(directory)


def _swap_in(target: Path, files: dict[str, bytes]) -> None:
    parent = target.parent
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
        fsync_path(tmp)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.rename(old, target)  # the second rename failed: put the old version back
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- load -----------------------------------------------------------------------------------------
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
MAX_DIMS, MAX_ELEMENTS = 8, 2**48  # per tensor (zero-length dims counted as 1)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}
BLOCK_KEYS = {"format_version", "library_version", "method", "config", "fingerprint"}


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The `adapterlab` block (made from PEFT's config for PEFT-written dirs) and the tensors.

    Untrusted input: never unpickles; the safetensors header's sizes are checked against the file
    before anything is read; the block is checked field by field and its config by the config's
    `validate` (unknown keys are dropped with a warning naming them). Every failure is an
    `AdapterFileError`. Holds a shared lock on the parent directory while reading (see `_locked`)."""
    root = Path(directory)
    with _locked(root.parent, shared=True):
        return _read_adapter(root)


def _read_adapter(root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not root.is_dir():
        hint = ""
        if root.parent.is_dir() and any(p.name.startswith(f".{root.name}.old-") for p in root.parent.iterdir()):
            hint = (f"; an interrupted save left the previous version in {root.parent}/.{root.name}.old-* "
                    "(the next al.save to this path puts it back, or rename it yourself)")
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
    header = _safetensors_header(weights)
    tensors = _read_tensors(weights)
    text = header.get("__metadata__", {}).get("adapterlab")
    if text is not None:
        block = _json(text, f"the {WEIGHTS_FILE} header")
    else:
        block = _from_peft(_json_file(root / CONFIG_FILE), root)
    return _check_block(block, root), tensors


def _not_safetensors(path: Path, why: str) -> AdapterFileError:
    why = why.replace("\r", "\\r").replace("\n", "\\n")  # safetensors' messages quote raw tensor names
    return AdapterFileError(f"{str(path)!r} is not a readable safetensors file ({why}); re-save the adapter")


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The file's JSON header, after checking every declared size against the file's size: a
    header length that fits, and for every tensor a known dtype, a shape, and a byte range inside
    the data section that holds exactly shape × dtype bytes. So nothing a header declares is
    allocated before it is known to be in the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            fits = 8 + length <= size and length <= MAX_HEADER_BYTES
            text = f.read(length) if fits else b""
    except OSError as e:
        raise _not_safetensors(path, str(e)) from None
    if not fits:
        raise _not_safetensors(path, f"its header length field says {length} bytes; the file has {size} bytes in all")
    header = _json(text, f"the header of {str(path)!r}")
    if not isinstance(header, dict):
        raise _not_safetensors(path, f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _not_safetensors(path, "its __metadata__ is not an object of strings")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, data_bytes)
    return header


def _naturals(value: Any) -> bool:
    """A JSON list of integers >= 0."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_entry(path: Path, name: str, entry: Any, data_bytes: int) -> None:
    """One tensor's header entry: {"dtype", "shape", "data_offsets"} that fit the data section."""
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(dtype, str) and dtype in DTYPE_BYTES and _naturals(shape) and _naturals(offsets)
            and len(offsets) == 2):
        raise _not_safetensors(path, f"tensor {name!r:.100} has the entry {entry!r:.100}; expected "
                                     f"dtype (one of {', '.join(DTYPE_BYTES)}), shape and data_offsets")
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise _not_safetensors(path, f"tensor {name!r:.100} declares shape {shape!r:.100}, too large")
    begin, end = offsets
    if not begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise _not_safetensors(path, f"tensor {name!r:.100} declares {dtype} {shape} at bytes [{begin}, {end}) "
                                     f"of a {data_bytes}-byte data section")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise _not_safetensors(path, str(e)) from None


def _json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # bad syntax or UTF-8, over-long integers, deep nesting
        raise AdapterFileError(f"{where} is not valid JSON ({str(e)[:200]!r}); re-save the adapter") from None


def _json_file(path: Path) -> Any:
    if not path.is_file():
        raise AdapterFileError(f"{str(path)!r} is missing; an adapter directory needs {CONFIG_FILE}")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise AdapterFileError(f"cannot read {str(path)!r} ({e})") from None
    return _json(text, str(path))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_block(block: Any, root: Path) -> dict[str, Any]:
    """The metadata block with every field checked (and the config validated and normalised by its
    config class); unknown keys are dropped with a warning."""
    where = f"{str(root)!r}: the adapterlab metadata"
    if not isinstance(block, dict) or not _is_int(block.get("format_version")) or block["format_version"] < 1:
        raise AdapterFileError(f"{where} is not a JSON object with an integer format_version >= 1; re-save the adapter")
    version, library = block["format_version"], block.get("library_version", "?")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{str(root)!r} has format version {version} (written by adapterlab {library!s:.40}); "
            f"this adapterlab {VERSION} reads up to {FORMAT_VERSION}. Upgrade adapterlab")
    unknown = sorted(set(block) - BLOCK_KEYS)
    if unknown:
        warnings.warn(f"{where} has unknown key(s) {unknown}; ignoring them", UserWarning, stacklevel=3)
    method = block.get("method")
    if not isinstance(method, str) or not isinstance(library, str):
        raise AdapterFileError(f"{where} needs 'method' and 'library_version' strings, got {method!r:.50} and "
                               f"{library!r:.50}; re-save the adapter")
    return {"format_version": version, "library_version": library, "method": method,
            "config": _check_config(block.get("config"), method, where),
            "fingerprint": _check_fingerprint_block(block.get("fingerprint"), where)}


def _check_config(data: Any, method: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("method") != method:
        raise AdapterFileError(f"{where}: config {data!r:.100} is not an object with method {method!r}; "
                               "re-save the adapter")
    try:
        return AdapterConfig.from_dict(data, strict=False).to_dict()
    except AdapterlabError as e:
        raise AdapterFileError(f"{where}: {e}") from None


def _check_fingerprint_block(fingerprint: Any, where: str) -> dict[str, Any]:
    """The fields loaders read: `modules` {path: {type, shape[, groups]}}, `sha256`, LEVI's `layers`
    {path: type}. Other keys pass through unchecked."""
    if fingerprint is None:
        return {}
    modules = fingerprint.get("modules", {}) if isinstance(fingerprint, dict) else None
    layers = fingerprint.get("layers", {}) if isinstance(fingerprint, dict) else None
    ok = (isinstance(modules, dict) and all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                            and _naturals(m.get("shape")) and _is_int(m.get("groups", 1))
                                            and m.get("groups", 1) >= 1 for m in modules.values())
          and isinstance(layers, dict) and all(isinstance(t, str) for t in layers.values())
          and isinstance(fingerprint.get("sha256", ""), str))
    if not ok:
        raise AdapterFileError(f"{where}: fingerprint {fingerprint!r:.100} is malformed; re-save the adapter")
    return fingerprint


def _from_peft(cfg: Any, root: Path) -> dict[str, Any]:
    """Our metadata block for a directory PEFT wrote (LoRA only); its values are checked by
    `_check_block` like ours."""
    if isinstance(cfg, dict) and "adapterlab" in cfg:
        return cfg["adapterlab"]
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise AdapterFileError(f"{str(root)!r}: cannot read a {kind!r:.50} adapter; adapterlab reads its own "
                               "directories and PEFT LoRA directories")
    used = [k for k, default in PEFT_UNSUPPORTED.items() if cfg.get(k, default) not in (default, None, {}, [], False)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias={cfg['bias']!r:.50}")
    if used:
        raise AdapterFileError(f"{str(root)!r} uses PEFT LoRA features adapterlab does not read: {used}")
    config = {"method": "lora", "r": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
              "dropout": cfg.get("lora_dropout", 0.0), "rslora": cfg.get("use_rslora", False)}
    return {"format_version": FORMAT_VERSION, "library_version": f"peft {cfg.get('peft_version', '?')!s:.40}",
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


def _on_meta(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose parameters and buffers are on the meta device (shapes, no
    memory): a delta built from it allocates nothing."""
    twin = copy.copy(module)
    twin.__dict__["_parameters"] = {k: None if p is None else nn.Parameter(p.detach().to("meta"), p.requires_grad)
                                    for k, p in module._parameters.items()}
    twin.__dict__["_buffers"] = {k: None if b is None else b.to("meta") for k, b in module._buffers.items()}
    return twin


def _check_lora_shapes(model: nn.Module, config: AdapterConfig, paths: list[str],
                       tensors: dict[str, torch.Tensor], directory: Any) -> None:
    """Before `plan` allocates LoRA factors, check their shapes against the file's tensors. LoRA is
    the method whose delta sizes come from a config number (r) rather than from the model or the
    file, so without this a tiny file declaring r = 10**9 would allocate r × width per module."""
    if not isinstance(config, LoRAConfig):
        return
    modules = dict(logical_modules(model))
    for path in paths:
        if config.supports(modules[path]) is not None:
            continue  # plan() reports it, naming the module
        try:
            dry = config.make_delta(_on_meta(modules[path]))
        except AdapterlabError:
            continue  # plan() raises the same error
        for key, want in dry.state_dict().items():
            full = f"{PREFIX}{path}.{key}"
            given = tensors.get(full)
            if given is None or given.shape != want.shape:
                has = "is missing" if given is None else f"has shape {list(given.shape)}"
                raise AdapterFileError(f"{str(directory)!r}: tensor {full!r} {has}; this model needs shape "
                                       f"{list(want.shape)} (LoRA r={config.r}). Re-save the adapter")


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
    inner = unwrapped(model)  # a DDP / DataParallel wrapper is looked through
    block, tensors = read_adapter(directory)
    if block.get("method") == "levi":
        raise AdapterFileError(f"{str(directory)!r} holds a LEVI side network, not weight deltas; "
                               "load it with al.levi.load(backbone, directory)")
    config = AdapterConfig.from_dict(block["config"])  # validated by read_adapter
    check_fingerprint(inner, block["fingerprint"])
    paths = _module_paths(inner, tensors, directory)
    _check_lora_shapes(inner, config, paths, tensors, directory)
    steps = [(path, module, _loaded_delta(config, path, module, delta, tensors, directory))
             for path, module, delta in plan(inner, config, name, paths=paths)]
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
    apply_plan(inner, name, steps, trainable=trainable)
    return model
