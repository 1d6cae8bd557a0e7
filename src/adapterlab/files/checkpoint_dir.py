"""Hugging Face checkpoint directories read as strictly as adapters: `model.safetensors`, or an
index (its weight_map checked: tensor names to plain shard file names, matching the shards'
headers) and its shards, every header through the one strict parser; and the extra files a merged
copy carries over (symlinks leading outside the directory are left out). diffusers model
directories too: a component folder (`diffusion_pytorch_model*.safetensors`, config.json) or a
pipeline (model_index.json), whose one `unet/` or `transformer/` folder is the checkpoint.
docs/cli.md#merge, docs/diffusers.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterFileError
from ..text import excerpt
from .adapter_dir import PICKLE_SUFFIXES
from .fs import is_regular, not_a_directory, read_regular
from .safetensors import TensorInfo, parse_json, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DIFFUSERS_STEM = "diffusion_pytorch_model"  # diffusers' weights: <stem>.safetensors[.index.json]
PIPELINE_INDEX = "model_index.json"
DENOISERS = ("unet", "transformer")  # the pipeline components adapters are merged into
# weight formats a merged checkpoint must not carry over: they would still hold the unmerged weights
_SHARD_NAME = re.compile(r"[\w.-]*?-(\d+)-of-(\d+)\.safetensors")
STALE_SUFFIXES = (".safetensors", ".msgpack", ".h5", ".onnx", ".gguf", *PICKLE_SUFFIXES)


@dataclass
class Checkpoint:
    """A Hugging Face model directory: its shard files and every tensor's header entry."""

    root: Path
    shards: list[Path]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    stem: str = "model"  # weight file names: <stem>.safetensors, <stem>-0000i-of-0000n.safetensors
    component: str | None = None  # the diffusers pipeline component this is (unet, transformer)

    @property
    def single_file(self) -> str:
        return f"{self.stem}.safetensors"

    @property
    def index_file(self) -> str:
        return f"{self.stem}.safetensors.index.json"

    def extra_files(self) -> tuple[list[Path], list[str]]:
        """(top-level files a merged copy carries over: config, tokenizer, …; the names it leaves
        out besides the checkpoint's own shards and index: other weight files and weight indexes,
        subdirectories, special files, and symlinks that lead outside the directory — their
        content is never copied; `outside_links` names those). A symlink to a regular file inside
        the directory is copied as a file."""
        keep, skip = [], []
        own = {self.index_file, *(shard.name for shard in self.shards)}
        outside = set(self.outside_links())
        for entry in sorted(self.root.iterdir()):
            if (
                is_regular(entry)
                and not entry.name.endswith(STALE_SUFFIXES)
                and not entry.name.endswith(".index.json")
                and entry.name not in outside
            ):
                keep.append(entry)
            elif entry.name not in own:
                skip.append(entry.name + ("/" if entry.is_dir() else ""))
        return keep, skip

    def outside_links(self) -> list[str]:
        """Top-level symlinks whose target lies outside the checkpoint directory (or nowhere)."""
        root = os.path.realpath(self.root)
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_symlink()
            and os.path.commonpath([root, os.path.realpath(entry)]) != root
            and entry.name not in {self.index_file, *(shard.name for shard in self.shards)}
        )


def open_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint in `directory` (headers only). Errors name what is missing and what to do."""
    root = Path(directory)
    if not root.is_dir():
        raise AdapterFileError(f"base model directory {str(root)!r} {not_a_directory(root, 'directory')}")
    component = root.name if root.name in DENOISERS else None
    if os.path.lexists(root / PIPELINE_INDEX) and not _has_weights(root):
        component = _denoiser(root)
        root = root / component
    stem = _stem(root)
    index, single = root / f"{stem}.safetensors.index.json", root / f"{stem}.safetensors"
    weight_map = _index(index) if os.path.lexists(index) else None
    if weight_map is not None:
        shards = _indexed_shards(index, weight_map)
    elif os.path.lexists(single):
        shards = [single]
    else:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFileError(
                f"{str(root)!r} holds only pickle weights {pickles[:3]}; adapterlab never unpickles "
                "(it can run code). Re-save the model with save_pretrained(dir) (safetensors)"
            )
        raise AdapterFileError(
            f"{str(root)!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (nor diffusers' "
            f"{DIFFUSERS_STEM}.safetensors); pass a Hugging Face model directory saved with save_pretrained"
        )
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        found, meta = read_header(shard)
        twice = sorted(set(found) & set(tensors))
        if twice:
            raise AdapterFileError(
                f"{str(root)!r}: tensor {twice[0]!r} is in two shards; the checkpoint is inconsistent"
            )
        tensors.update(found)
        metadata = metadata or meta
    if weight_map is not None:
        _check_weight_map(index, weight_map, tensors)
    return Checkpoint(root, shards, tensors, metadata, stem, component)


def _has_weights(root: Path) -> bool:
    names = (
        SINGLE_FILE,
        INDEX_FILE,
        f"{DIFFUSERS_STEM}.safetensors",
        f"{DIFFUSERS_STEM}.safetensors.index.json",
    )
    return any(os.path.lexists(root / n) for n in names)


def _stem(root: Path) -> str:
    """ "model" (transformers) or diffusers' stem, by the weight files present; both is ambiguous."""
    found = [
        stem
        for stem in ("model", DIFFUSERS_STEM)
        if os.path.lexists(root / f"{stem}.safetensors")
        or os.path.lexists(root / f"{stem}.safetensors.index.json")
    ]
    if len(found) > 1:
        raise AdapterFileError(
            f"{str(root)!r} holds both {SINGLE_FILE}-style and {DIFFUSERS_STEM}-style weights; which one is "
            "the model is unclear. Keep one set of weight files in the directory"
        )
    return found[0] if found else "model"


def _denoiser(root: Path) -> str:
    """The one unet/transformer component folder of a diffusers pipeline directory."""
    path = root / PIPELINE_INDEX
    index = parse_json(read_regular(path, "pipeline index", limit=2**20), repr(str(path)))
    if not isinstance(index, dict):
        raise AdapterFileError(
            f"{str(path)!r} is {excerpt(index, 80)}, not a JSON object; re-save the pipeline"
        )
    found = [c for c in DENOISERS if c in index and (root / c).is_dir()]
    if len(found) != 1:
        has = "both " + " and ".join(found) if found else f"no {' or '.join(DENOISERS)} folder"
        raise AdapterFileError(
            f"{str(root)!r} is a diffusers pipeline with {has}; pass the component folder to merge into, "
            f"e.g. {str(root / (found or DENOISERS)[0])!r}"
        )
    return found[0]


def _index(path: Path) -> dict[str, str]:
    """The index's weight_map: {tensor name: shard file name}, every name a string."""
    index = parse_json(read_regular(path, "shard index"), repr(str(path)))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (
        isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())
    ):
        raise AdapterFileError(
            f"{str(path)!r} is not a valid index: it needs a non-empty 'weight_map' object of "
            f"tensor names to shard file names, got {excerpt(weight_map, 80)}; re-save the model"
        )
    return weight_map


def _indexed_shards(index: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shard files the index names: plain file names in its directory."""
    root = index.parent
    names = sorted(set(weight_map.values()))
    bad = [
        n for n in names if n in ("", ".", "..") or "/" in n or "\\" in n or "\0" in n or n.startswith(".")
    ]
    if bad:
        raise AdapterFileError(
            f"{str(index)!r} names shard {excerpt(bad[0], 80)}, which is not a plain file name in the "
            "model directory; the index is corrupt"
        )
    missing = [n for n in names if not os.path.lexists(root / n)]
    if missing:
        raise AdapterFileError(
            f"{str(index)!r} names shard(s) {missing[:3]} that are not "
            "files of the directory; the checkpoint is incomplete"
        )
    numbered = [_SHARD_NAME.fullmatch(n) for n in names]
    if all(numbered):  # model-00001-of-00004.safetensors …: the index names every one of the 4
        counts = {int(m.group(2)) for m in numbered if m}
        found = {int(m.group(1)) for m in numbered if m}
        if len(counts) == 1 and found != set(range(1, max(counts) + 1)):
            raise AdapterFileError(
                f"{str(index)!r} names {len(found)} of the {max(counts)} shards its shard names "
                "count; the index does not match its shards. Re-save the model"
            )
    return [root / n for n in names]


def _check_weight_map(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """The index says for every tensor the shard it is in, and names no tensor that is not there."""
    wrong = [k for k, info in tensors.items() if weight_map.get(k) != info.file.name] + [
        k for k in weight_map if k not in tensors
    ]
    if wrong:
        key = wrong[0]
        where = tensors[key].file.name if key in tensors else "no shard"
        raise AdapterFileError(
            f"{str(index)!r} puts tensor {excerpt(key, 100)} in {excerpt(weight_map.get(key), 80)} but it is in "
            f"{where}; the index does not match its shards. Re-save the model"
        )
