"""Safetensors, strictly: one header parser with one set of limits and one dtype table, a reader
of single tensors and a streaming writer. Adapters, base checkpoints and exports all use it.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _encode
from torch import Tensor

from ..errors import AdapterFileError
from ..text import excerpt
from .fs import open_regular, storage_error

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
MAX_DIMS, MAX_ELEMENTS = 8, 2**48  # per tensor (zero-length dims counted as 1)
DTYPES = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }.items()
    if dtype is not None
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class TensorInfo:
    """One tensor of a safetensors file: dtype name, shape, absolute byte range in `file`."""

    dtype: str
    shape: list[int]
    start: int
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def not_safetensors(path: Path, why: str) -> AdapterFileError:
    why = why.replace("\r", "\\r").replace("\n", "\\n")  # safetensors' messages quote raw tensor names
    return AdapterFileError(f"{str(path)!r} is not a readable safetensors file ({why}); re-save it")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str | bytes, where: str, constants: bool = True) -> Any:
    """JSON from an untrusted file, or an `AdapterFileError` naming `where`. Without `constants`,
    Python's NaN / Infinity / -Infinity extensions are refused too (as the safetensors library
    refuses them in a header)."""
    try:
        return json.loads(text) if constants else json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # bad syntax or UTF-8, over-long integers, deep nesting
        raise AdapterFileError(f"{where} is not valid JSON ({str(e)[:200]!r}); re-save the adapter") from None


def naturals(value: Any) -> TypeGuard[list[int]]:
    """A JSON list of integers >= 0."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors a safetensors file declares (in data order) and its metadata, after checking
    every declared size against the file: a header length that fits, and for every tensor a known
    dtype, a shape, and a byte range inside the data section that holds exactly shape × dtype
    bytes, the ranges together covering the data section exactly (no gap, no overlap: what the
    safetensors library requires). So nothing a header declares is allocated before it is known
    to be in the file. Only a regular file is opened (a FIFO or /dev/zero is an error)."""
    with open_regular(path, "safetensors file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            fits = 8 + length <= size and length <= MAX_HEADER_BYTES
            text = f.read(length) if fits else b""
        except OSError as e:
            raise storage_error(e, path, "read") from None
    if not fits:
        raise not_safetensors(
            path, f"its header length field says {length} bytes; the file has {size} bytes in all"
        )
    header = parse_json(text, f"the header of {str(path)!r}", constants=False)
    if not isinstance(header, dict):
        raise not_safetensors(path, f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise not_safetensors(path, f"its __metadata__ {excerpt(metadata, 60)} is not an object of strings")
    tensors = {name: _entry(path, name, entry, 8 + length, size) for name, entry in header.items()}
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)))
    _check_coverage(path, ordered, 8 + length, size)
    return ordered, metadata


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The byte ranges, in order, tile the data section: each starts where the previous ended, the
    first at its start, the last at the end of the file."""
    at = data_start
    for name, info in tensors.items():
        if info.start != at:
            what = "overlaps the one before it" if info.start < at else f"leaves bytes [{at - data_start}, "
            what += "" if info.start < at else f"{info.start - data_start}) before it unused"
            raise not_safetensors(path, f"tensor {excerpt(name, 100)}'s byte range {what}")
        at = info.end
    if at != size:
        raise not_safetensors(
            path, f"its tensors end at byte {at - data_start} of a {size - data_start}-byte data section"
        )


def _entry(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    """One tensor's header entry: {"dtype", "shape", "data_offsets"} that fit the data section."""
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (
        isinstance(dtype, str)
        and dtype in DTYPES
        and naturals(shape)
        and naturals(offsets)
        and len(offsets) == 2
    ):
        raise not_safetensors(
            path,
            f"tensor {excerpt(name, 100)} has the entry {excerpt(entry, 100)}; expected "
            f"dtype (one of {', '.join(DTYPES)}), shape and data_offsets",
        )
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise not_safetensors(
            path, f"tensor {excerpt(name, 100)} declares shape {excerpt(shape, 100)}, too large"
        )
    begin, end = offsets
    data_bytes = size - data_start
    if not begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise not_safetensors(
            path,
            f"tensor {excerpt(name, 100)} declares {dtype} {shape} at bytes [{begin}, {end}) "
            f"of a {data_bytes}-byte data section",
        )
    return TensorInfo(dtype, shape, data_start + begin, data_start + end, path)


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a (small) safetensors file, and its metadata; the header is checked first."""
    _, metadata = read_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118  (not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise not_safetensors(path, str(e)) from None


def read_tensor(f: io.BufferedIOBase, info: TensorInfo) -> Tensor:
    """The tensor `info` describes, read from the open file `f` into fresh memory."""
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buffer = bytearray(info.nbytes)
    f.seek(info.start)
    if f.readinto(buffer) != info.nbytes:
        raise AdapterFileError(f"{str(info.file)!r} ended early; the file is truncated")
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


def encode(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """A whole safetensors file in memory (adapters: small)."""
    return _encode(tensors, metadata=metadata)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor in a fixed order: the header (from the planned
    names, dtypes and shapes) first, then each tensor's bytes; `close` checks all were written and
    fsyncs the file."""

    def __init__(
        self, path: Path, layout: list[tuple[str, str, list[int]]], metadata: dict[str, str]
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.sizes = []
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self.sizes.append(nbytes)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.layout, self.done, self.path = layout, 0, path
        self.file = open(path, "wb")  # noqa: SIM115  (closed by close() / __exit__)
        self.file.write(len(text).to_bytes(8, "little") + text)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()  # after close() a no-op; on an error the caller removes the partial file

    def _next(self, name: str) -> tuple[str, list[int]]:
        want, dtype, shape = self.layout[self.done]
        if name != want:
            raise RuntimeError(f"writing {name!r} but {want!r} comes next in {self.path}")
        self.done += 1
        return dtype, shape

    def write(self, name: str, tensor: Tensor) -> None:
        """The next tensor, as a tensor of its planned dtype and shape."""
        dtype, shape = self._next(name)
        if DTYPE_NAMES.get(tensor.dtype) != dtype or list(tensor.shape) != list(shape):
            raise RuntimeError(f"{name!r} is {tensor.dtype} {list(tensor.shape)}, planned {dtype} {shape}")
        if tensor.numel():
            self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def copy(self, name: str, source: io.BufferedIOBase, info: TensorInfo, buffer: bytearray) -> None:
        """The next tensor, copied byte for byte from `info`'s range of the open file `source`."""
        self._next(name)
        source.seek(info.start)
        view, left = memoryview(buffer), info.nbytes
        while left:
            got = source.readinto(view[: min(left, len(buffer))])
            if not got:
                raise AdapterFileError(f"{str(info.file)!r} ended early; the file is truncated")
            self.file.write(view[:got])
            left -= got

    def close(self) -> None:
        if self.done != len(self.layout):
            raise RuntimeError(
                f"{self.path}: {len(self.layout) - self.done} planned tensors were not written"
            )
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
