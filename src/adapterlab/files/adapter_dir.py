"""Adapter directories: the format's constants, the metadata block (written and checked field by
field; the fingerprint it holds: fingerprint.py), PEFT's config both ways, and `AdapterFile`, a
directory read without its base model (what the CLI works on). The format:
docs/architecture.md#files.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, config_class, methods, peft_config_class, registry
from ..errors import AdapterFileError, AdapterlabError
from ..layer import Delta
from ..targeting import module_path_ok
from ..text import excerpt
from ..version import VERSION
from .atomic import interrupted_hint, locked
from .diffusers_dir import DiffusersFile, is_diffusers_dir, peft_fields, read_diffusers
from .fill import fill_delta
from .fs import is_regular, not_a_directory, read_regular
from .safetensors import MAX_DIMS, MAX_ELEMENTS, encode, naturals, parse_json, read_tensors

# the newest format read and written; 2 adds "buffers" (running statistics saved with the adapter),
# and a file without them is written as 1, which every version reads
FORMAT_VERSION = 2
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
METADATA_KEYS = {"format_version", "library_version", "method", "config", "fingerprint", "buffers"}


# -- write ----------------------------------------------------------------------------------------
def metadata_block(
    config: AdapterConfig, fingerprint: dict[str, Any], buffers: list[str] | None = None
) -> dict[str, Any]:
    """The `adapterlab` block: format and library version, method, config, fingerprint, and the
    keys (without PREFIX) of the model buffers stored beside the deltas (running_stats.py), if any."""
    block = {
        "format_version": FORMAT_VERSION if buffers else 1,
        "library_version": VERSION,
        "method": config.method,
        "config": config.to_dict(),
        "fingerprint": fingerprint,
    }
    return {**block, "buffers": sorted(buffers)} if buffers else block


def directory_files(
    tensors: dict[str, Tensor], metadata: dict[str, Any], peft: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """{file name: bytes} of an adapter directory; adapter_config.json is PEFT's config if given."""
    json_config = peft or {"adapterlab": metadata}
    return {
        WEIGHTS_FILE: encode(tensors, {"adapterlab": json.dumps(metadata)}),
        CONFIG_FILE: (json.dumps(json_config, indent=2, sort_keys=True) + "\n").encode(),
    }


def peft_config(
    config: AdapterConfig, paths: list[str], deltas: list[Delta], name_or_path: str | None
) -> dict[str, Any] | None:
    """adapter_config.json as PEFT writes it for this adapter, or None when PEFT cannot express it."""
    fields = config.to_peft(paths, deltas)
    return None if fields is None else {"base_model_name_or_path": name_or_path, **fields}


# -- read -----------------------------------------------------------------------------------------
def read_adapter(
    directory: str | os.PathLike[str], component: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The `adapterlab` metadata (made from PEFT's config for PEFT-written dirs and diffusers' LoRA
    files) and the deltas' tensors; the model buffers the file stores are moved to
    `metadata["buffers"]` ({key: tensor}). `component` picks one component of a pipeline's
    diffusers LoRA file.

    Untrusted input: never unpickles; the safetensors header's sizes are checked against the file
    before anything is read; the metadata is checked field by field and its config by the config's
    `validate` (unknown keys are dropped with a warning naming them). Every failure is an
    `AdapterFileError`. Holds a shared lock on the parent directory while reading."""
    root = Path(directory)
    with locked(root.parent, shared=True):
        return _read_adapter(root, component)


def _read_adapter(root: Path, component: str | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not root.is_dir():
        found = not_a_directory(root, "directory")
        raise AdapterFileError(f"adapter directory {str(root)!r} {found}{interrupted_hint(root)}")
    weights = root / WEIGHTS_FILE
    for path, what in ((weights, "adapter weights file"), (root / CONFIG_FILE, "adapter config")):
        if os.path.lexists(path) and not is_regular(path):
            read_regular(path, what)  # raises, saying what it is (a FIFO, a directory, /dev/zero …)
    if not os.path.lexists(weights) and is_diffusers_dir(root):
        metadata, tensors = _read_diffusers(root, component)
    elif not weights.is_file():
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterFileError(
                f"{str(root)!r} holds only pickle weights {pickles}; adapterlab never unpickles (it can run code). "
                "Convert them with safetensors in a process you trust: "
                "safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')"
            )
        raise AdapterFileError(f"{str(root)!r} has no {WEIGHTS_FILE}; is it an adapter directory?")
    else:
        tensors, header = read_tensors(weights)
        text = header.get("adapterlab")
        if text is not None:
            metadata = parse_json(text, f"the {WEIGHTS_FILE} header")
        else:
            metadata = _from_peft(_json_file(root / CONFIG_FILE), root)
    metadata = _check_metadata(metadata, root)
    metadata["buffers"] = _pop_buffers(metadata["buffers"], tensors, root)
    modules = metadata["fingerprint"].get("modules")
    if modules:  # tensors a method stores in another layout (LoRA on expert weights: PEFT's)
        local = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: t for k, t in tensors.items()}
        native = config_class(metadata["method"]).native_tensors(local, modules, repr(str(root)))
        tensors = {PREFIX + k: t for k, t in native.items()}
    return metadata, tensors


def _read_diffusers(root: Path, component: str | None) -> tuple[Any, dict[str, Tensor]]:
    """A diffusers LoRA file: our block if we wrote it, else PEFT's fields from its
    lora_adapter_metadata, else the fields diffusers infers (a config class's `peft_inferred`)."""
    found = read_diffusers(root, component)
    tensors = {PREFIX + k: t for k, t in found.tensors.items()}
    text = found.header.get("adapterlab")
    if text is not None:
        return parse_json(text, "the diffusers file's header"), tensors
    where = repr(str(root))
    if found.peft is not None and found.alphas:
        raise AdapterFileError(
            f"{where} has both {len(found.alphas)} network alphas (e.g. {next(iter(found.alphas))!r}.alpha) "
            "and lora_adapter_metadata; diffusers refuses such a file too. Drop one of them"
        )
    data = found.peft if found.peft is not None else _inferred(found, where)
    if "peft_type" not in data:  # diffusers builds a LoraConfig from the fields: the claimant's type
        data = {**data, "peft_type": _inferred(found, where)["peft_type"]}
    return _from_peft(data, root), tensors


def _inferred(found: DiffusersFile, where: str) -> dict[str, Any]:
    """PEFT's config fields as diffusers infers them for a file without lora_adapter_metadata."""
    for cls in registry().values():
        fields = cls.peft_inferred(found.tensors, found.alphas, where)
        if fields is not None:
            return fields
    raise AdapterFileError(
        f"{where}: tensors such as {excerpt(next(iter(found.tensors)), 100)} are not LoRA factors of a "
        "format adapterlab reads ('<module>.lora_A.weight' / 'lora_B.weight')"
    )


def _json_file(path: Path) -> Any:
    if not os.path.lexists(path):
        raise AdapterFileError(f"{str(path)!r} is missing; an adapter directory needs {CONFIG_FILE}")
    return parse_json(read_regular(path, "adapter config"), str(path))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata(metadata: Any, root: Path) -> dict[str, Any]:
    """The metadata block with every field checked (and the config validated and normalised by its
    config class); unknown keys are dropped with a warning."""
    where = f"{str(root)!r}: the adapterlab metadata"
    if (
        not isinstance(metadata, dict)
        or not _is_int(metadata.get("format_version"))
        or metadata["format_version"] < 1
    ):
        raise AdapterFileError(
            f"{where} is not a JSON object with an integer format_version >= 1; re-save the adapter"
        )
    version, library = metadata["format_version"], metadata.get("library_version", "?")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{str(root)!r} has format version {version} (written by adapterlab {excerpt(library, 40)}); "
            f"this adapterlab {VERSION} reads up to {FORMAT_VERSION}. Upgrade adapterlab"
        )
    unknown = sorted(set(metadata) - METADATA_KEYS)
    if unknown:
        warnings.warn(f"{where} has unknown key(s) {unknown}; ignoring them", UserWarning, stacklevel=4)
    method = metadata.get("method")
    if not isinstance(method, str) or not isinstance(library, str):
        raise AdapterFileError(
            f"{where} needs 'method' and 'library_version' strings, got {excerpt(method, 50)} and "
            f"{excerpt(library, 50)}; re-save the adapter"
        )
    if method not in methods():  # exactly: "LEVI" must not pass as "levi" anywhere
        raise AdapterFileError(
            f"{where}: method {excerpt(method, 50)} is not one of {', '.join(methods())} (names are exact, "
            "lower case); re-save the adapter"
        )
    return {
        "format_version": version,
        "library_version": library,
        "method": method,
        "config": _check_config(metadata.get("config"), method, where),
        "fingerprint": _parse_fingerprint(metadata.get("fingerprint"), where),
        "buffers": metadata.get("buffers", []),
    }


def _pop_buffers(keys: Any, tensors: dict[str, Tensor], root: Path) -> dict[str, Tensor]:
    """{key: tensor} of the buffers the metadata lists, taken out of `tensors`."""
    if not (isinstance(keys, list) and all(module_path_ok(k) for k in keys) and len(set(keys)) == len(keys)):
        raise AdapterFileError(
            f"{str(root)!r}: the adapterlab metadata's buffers {excerpt(keys)} are not a list of "
            "'<module path>.<buffer>' keys; re-save the adapter"
        )
    missing = [k for k in keys if PREFIX + k not in tensors]
    if missing:
        raise AdapterFileError(
            f"{str(root)!r}: the metadata lists buffer {excerpt(missing[0], 80)}, but {WEIGHTS_FILE} has no "
            f"tensor {excerpt(PREFIX + missing[0], 100)}; re-save the adapter"
        )
    return {k: tensors.pop(PREFIX + k) for k in keys}


def _check_config(data: Any, method: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("method") != method:
        raise AdapterFileError(
            f"{where}: config {excerpt(data)} is not an object with method {method!r}; re-save the adapter"
        )
    try:
        return AdapterConfig.from_dict(data, strict=False).to_dict()
    except AdapterlabError as e:
        raise AdapterFileError(f"{where}: {e}") from None


def _entry_ok(entry: Any) -> bool:
    """A fingerprint entry {type, shape[, groups]}: a short type name, 1..8 positive dims whose
    product is bounded (counted in Python ints), and the layout its type needs (a Linear or Conv1D
    has 2 dims, a ConvNd n+2 whose output channels its groups divide)."""
    if not (isinstance(entry, dict) and isinstance(entry.get("type"), str) and naturals(entry.get("shape"))):
        return False
    kind, shape, groups = entry["type"], entry["shape"], entry.get("groups", 1)
    if not (0 < len(kind) <= 100 and 1 <= len(shape) <= MAX_DIMS and all(shape)):
        return False
    if not (_is_int(groups) and groups >= 1 and math.prod(shape) <= MAX_ELEMENTS):
        return False
    if kind in ("Conv1d", "Conv2d", "Conv3d"):
        return len(shape) == int(kind[4]) + 2 and shape[0] % groups == 0
    if kind == "Conv1D" or kind.endswith("Linear"):
        return len(shape) == 2 and groups == 1
    return True


def _parse_fingerprint(fingerprint: Any, where: str) -> dict[str, Any]:
    """The fields loaders read: `modules` {path: {type, shape[, groups]}}, `sha256`, LEVI's `layers`
    {path: type}. Other keys pass through unchecked."""
    if fingerprint is None:
        return {}
    modules = fingerprint.get("modules", {}) if isinstance(fingerprint, dict) else None
    layers = fingerprint.get("layers", {}) if isinstance(fingerprint, dict) else None
    ok = (
        isinstance(modules, dict)
        and all(module_path_ok(p) and _entry_ok(m) for p, m in modules.items())
        and isinstance(layers, dict)
        and all(isinstance(t, str) for t in layers.values())
        and isinstance(fingerprint.get("sha256", ""), str)
    )
    if not ok:
        raise AdapterFileError(
            f"{where}: fingerprint {excerpt(fingerprint)} is malformed; re-save the adapter"
        )
    return dict(fingerprint)


def _from_peft(data: Any, root: Path) -> dict[str, Any]:
    """Our metadata block for a directory PEFT wrote; its values are checked by `_check_metadata`
    like ours. It has no fingerprint (see `AdapterConfig.peft_modules`)."""
    if isinstance(data, dict) and "adapterlab" in data:
        block: dict[str, Any] = data["adapterlab"]
        return block
    cls = peft_config_class(data.get("peft_type")) if isinstance(data, dict) else None
    if cls is None:
        kind = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise AdapterFileError(
            f"{str(root)!r}: cannot read a {excerpt(kind, 50)} adapter; adapterlab reads its own "
            "directories and PEFT LoRA directories"
        )
    config = cls.from_peft(data, repr(str(root)))
    return {
        "format_version": FORMAT_VERSION,
        "library_version": f"peft {str(data.get('peft_version', '?'))[:40]}",
        "method": config["method"],
        "config": config,
        "fingerprint": {},
    }


def split_by_module(
    tensors: dict[str, Tensor], paths: set[str], where: str, whose: str
) -> dict[str, dict[str, Tensor]]:
    """Each tensor under the longest of `paths` that prefixes its key, keyed relative to it."""
    owned: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        parts = key[len(PREFIX) :].split(".") if key.startswith(PREFIX) else []
        owner = next(
            (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in paths), None
        )
        if owner is None:
            raise AdapterFileError(
                f"{where}: tensor {key!r} belongs to no module of {whose} (keys look like "
                f"'{PREFIX}<module path>.<param>')"
            )
        owned.setdefault(owner, {})[key[len(PREFIX) + len(owner) + 1 :]] = t
    if not owned:
        raise AdapterFileError(f"{where} holds no tensors")
    return dict(sorted(owned.items()))


# -- a directory without its model ----------------------------------------------------------------
@dataclass
class AdapterFile:
    """A saved adapter read without its base model: metadata, tensors, config, targeted modules."""

    directory: Path
    metadata: dict[str, Any]
    tensors: dict[str, Tensor]
    config: AdapterConfig
    modules: dict[str, dict[str, Any]]  # path -> fingerprint entry {type, shape[, groups]}
    peft_config: dict[str, Any] | None = None  # adapter_config.json, when it is PEFT's
    _owned: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], component: str | None = None) -> AdapterFile:
        """Read `directory` (adapterlab's, PEFT's or diffusers'; `component` picks one of a
        pipeline's diffusers file); every failure is an `AdapterFileError`."""
        root = Path(directory)
        metadata, tensors = read_adapter(root, component)
        config = AdapterConfig.from_dict(metadata["config"])
        peft = _peft_json(root, component)
        if config.side_network:
            modules = {}
        elif metadata["fingerprint"].get("modules"):
            modules = metadata["fingerprint"]["modules"]
        else:
            local = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: t for k, t in tensors.items()}
            modules = type(config).peft_modules(peft or {}, local, repr(str(root)))
        adapter = cls(root, metadata, tensors, config, modules, peft)
        if modules:
            adapter._owned = split_by_module(
                tensors, set(modules), repr(str(root)), "the fingerprint; re-save the adapter"
            )
        return adapter

    @property
    def block(self) -> dict[str, Any]:
        """The metadata block for files made from this adapter's deltas alone (exports): without
        the running statistics, which such files do not carry."""
        return {k: v for k, v in self.metadata.items() if k != "buffers"}

    @property
    def method(self) -> str:
        return str(self.metadata["method"])

    @property
    def name(self) -> str:
        return str(self.directory)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype for zero skeletons: float64 if the adapter holds float64 tensors (it was
        trained on a float64 base), else float32 (what adapters train in on every other base)."""
        return (
            torch.float64 if any(t.dtype == torch.float64 for t in self.tensors.values()) else torch.float32
        )

    def require_deltas(self, doing: str) -> None:
        """Raise unless the adapter is made of per-module deltas (not a side network)."""
        if self.config.side_network:
            raise AdapterFileError(
                f"{self.name!r} holds a {self.config.method.upper()} side network, not weight "
                f"deltas: it cannot be {doing}. Use it with al.{self.method}.load(backbone, directory)"
            )

    def fit_base(self, shapes: dict[str, list[int]], conv1d: bool | None) -> None:
        """A PEFT directory (no fingerprint): each module's type fixed by the base weight's shape
        `shapes[path]` (the config class's `peft_base_entry`), as `al.load` into that model would."""
        if self.peft_config is None or self.metadata["fingerprint"].get("modules"):
            return
        cls = type(self.config)
        for path, shape in shapes.items():
            if path in self.modules:
                self.modules[path] = cls.peft_base_entry(self.modules[path], list(shape), conv1d)

    def delta(self, path: str, module: nn.Module) -> Delta:
        """The delta of module `path`, built on `module` (a skeleton) and filled from the file."""
        return fill_delta(
            self.config, module, self._owned.get(path, {}), f"{self.name!r}: module {path!r}", path
        )


def _peft_json(root: Path, component: str | None = None) -> dict[str, Any] | None:
    """adapter_config.json when it is PEFT's config (not our block), or a diffusers file's
    lora_adapter_metadata, else None."""
    try:
        if not os.path.lexists(root / WEIGHTS_FILE) and is_diffusers_dir(root):
            data: Any = peft_fields(root, component)
            if data is None:  # no lora_adapter_metadata: the fields diffusers infers
                data = _inferred(read_diffusers(root, component), repr(str(root)))
        elif not is_regular(root / CONFIG_FILE):
            return None  # missing; anything else is refused by _json_file when it is read
        else:
            data = json.loads(read_regular(root / CONFIG_FILE, "adapter config"))
    except (AdapterlabError, OSError, ValueError, RecursionError):  # unreadable, not JSON, too deep
        return None
    return data if isinstance(data, dict) and peft_config_class(data.get("peft_type")) is not None else None
