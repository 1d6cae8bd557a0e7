"""Exact undo of a merge into an fp16/bf16 weight, for a few percent of the weight's bytes.

Merging rounds `W + Σ w·ΔW` (fp32) to the weight's dtype. Unmerge subtracts the same fp32 change
from the merged weight and rounds again; that gives most entries back. It can miss only where the
merge lost bits: where the merged entry's exponent is k binades above the round trip's, about k
low bits of the old entry are gone. Unmerge can see k itself (from the merged weight and the
round trip), so the record keeps, for those entries only, a k-bit code of the old entry's offset
(in ulps) from the round trip, packed into a bitstream, plus an exception list (flat position,
old entry) for whatever the codes do not give back (ties, signed zeros, NaNs, long offsets).
Merge decodes what it encoded and compares bit patterns, so the record is exact for every input.

All work runs in chunks of `CHUNK` entries on the weight's device; the record stays there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 1 << 18  # entries per step: bounds the temporaries beyond the weight and its fp32 change
MAX_CODE = 16  # longest code in bits; an entry that would need more goes to the exceptions
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
_ALL_ONES = {torch.bfloat16: 0xFF, torch.float16: 0x1F}  # the exponent field of inf and NaN


@dataclass
class RoundingRecord:
    """What undoing one merge needs besides subtracting the change and rounding: `codes` (the
    packed offsets), `where`/`values` (exceptions: flat positions, old entries as int16 bit
    patterns), or `copy` (the whole old weight, when that is fewer bytes; then the other fields
    are empty). `chunk`: the
    entries per step the codes were written in (unmerge reads them in the same steps); `finite`:
    whether every merged entry is finite (merge's NaN/Inf check, without another pass)."""

    chunk: int
    codes: Tensor
    where: Tensor
    values: Tensor
    copy: Tensor | None = None
    finite: bool = True

    def nbytes(self) -> int:
        """Bytes this record keeps."""
        parts = [self.codes, self.where, self.values] + ([self.copy] if self.copy is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


def merge_(flat: Tensor, changes: list[Tensor], chunk: int = CHUNK) -> RoundingRecord:
    """Write `flat + changes[0] + changes[1] + ...` (fp32 changes, added in that order, rounded
    once to `flat`'s dtype) into `flat` (a contiguous 1-D fp16/bf16 weight) and return the record
    with which `unmerge_(flat, change)` undoes it, `change` being `0 + changes[0] + ...` (fp32)."""
    codes: list[Tensor] = []
    where: list[Tensor] = []
    values: list[Tensor] = []
    finite = True
    for start in range(0, flat.numel(), chunk):
        before, part = flat[start : start + chunk], slice(start, start + chunk)
        total, change = before.to(torch.float32), torch.zeros_like(changes[0][part])
        for c in changes:
            total, change = total + c[part], change + c[part]
        merged = total.to(flat.dtype)
        # NaN/Inf have every exponent bit set (a max, not isfinite: one kernel fewer paged in)
        finite = finite and int(_exponent(merged).max()) < _ALL_ONES[flat.dtype]
        ordered, length, bias = _plan(merged, change)
        old = before.view(torch.int16).int()  # bit patterns (int32 throughout: fewer kernels paged in)
        code = _ordered(before) - ordered + bias
        code = torch.where((length > 0) & ((code >> length) == 0), code, bias)  # 0 <= code < 2^length
        restored = _unordered(ordered + torch.where(length > 0, code - bias, 0))
        wrong = (restored != old).nonzero().reshape(-1)
        codes += _pack(code, length)
        where.append(wrong + start)
        values.append(old[wrong])
        flat[start : start + chunk] = merged
    index = torch.int32 if flat.numel() < 2**31 else torch.int64
    record = RoundingRecord(
        chunk,
        torch.cat(codes) if codes else flat.new_empty(0, dtype=torch.uint8),
        torch.cat(where).to(index) if where else flat.new_empty(0, dtype=index),
        (torch.cat(values) if values else flat.new_empty(0, dtype=torch.int32)).to(torch.int16),
        finite=finite,
    )
    if record.nbytes() >= flat.numel() * flat.element_size():  # a copy is smaller
        copy = flat.clone()
        unmerge_(copy, sum(changes, torch.zeros_like(changes[0])), record)
        empty = record.where.new_empty(0)  # not slices: those would keep the storage alive
        record = RoundingRecord(
            chunk, record.codes.new_empty(0), empty, record.values.new_empty(0), copy, finite
        )
    return record


def unmerge_(flat: Tensor, change: Tensor, record: RoundingRecord) -> None:
    """Undo `merge_` in place: `flat` becomes bit for bit what it was before the merge."""
    if record.copy is not None:
        flat.copy_(record.copy)
        return
    offset = 0
    for start in range(0, flat.numel(), record.chunk):
        merged, part = flat[start : start + record.chunk], slice(start, start + record.chunk)
        ordered, length, bias = _plan(merged, change[part])
        code = torch.zeros_like(length)
        for bits in range(1, int(length.max()) + 1 if length.numel() else 1):
            chosen = length == bits
            count = int(chosen.sum())
            if count:
                size = (count * bits + 7) // 8
                code[chosen] = _unpack(record.codes[offset : offset + size], count, bits)
                offset += size
        restored = _unordered(ordered + torch.where(length > 0, code - bias, 0))
        flat[part] = restored.to(torch.int16).view(flat.dtype)
    flat.view(torch.int16)[record.where.long()] = record.values


def _plan(merged: Tensor, change: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What unmerge computes from the merged entries and the change alone: the round trip (as
    ordered integers), each entry's code length (binades lost, 0 if none or over MAX_CODE; 2 for
    a round trip at the bottom of its binade, where the old entry may sit one finer ulp below)
    and the bias that makes the code of the likely offsets run from 0 to 2^length - 1."""
    exact = merged.to(torch.float32) - change
    back = exact.to(merged.dtype)
    lost = _exponent(merged) - _exponent(back)
    bottom = (back.view(torch.int16).int() & ((1 << _MANTISSA[merged.dtype]) - 1)) == 0
    lost = torch.where((lost == 0) & bottom & (_exponent(back) > 0), 2, lost)
    length = torch.where((lost > 0) & (lost < MAX_CODE + 1), lost, 0)
    # the old entry lies within half a merged ulp (2^(length-1) old ulps) of `exact`
    bias = ((1 << length) >> 1) - (exact > back.to(torch.float32)).int()
    return _ordered(back), length, bias


def _exponent(x: Tensor) -> Tensor:
    """The exponent fields of fp16/bf16 entries, as int32."""
    return (x.view(torch.int16).int() & 0x7FFF) >> _MANTISSA[x.dtype]


def _ordered(x: Tensor) -> Tensor:
    """fp16/bf16 bit patterns as int32 that count in ulps across zero (±0 both map to 0)."""
    bits = x.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _unordered(ordered: Tensor) -> Tensor:
    """Inverse of `_ordered` (to +0 for 0): int16 bit patterns, as int32 (out-of-range values wrap;
    merge's check catches them)."""
    negative = ordered < 0
    magnitude = torch.where(negative, -ordered, ordered) & 0x7FFF
    return torch.where(negative, magnitude - 0x8000, magnitude)


def _pack(code: Tensor, length: Tensor) -> list[Tensor]:
    """The codes of each length (1, 2, ...), in entry order, as little-endian bitstreams. (The bit
    work runs in int32, as the rest: each extra dtype's kernels are code paged into memory.)"""
    out = []
    for bits in range(1, int(length.max()) + 1 if length.numel() else 1):
        values = code[length == bits]
        if values.numel():
            stream = ((values[:, None] >> _powers(bits, code)) & 1).reshape(-1)
            stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).view(-1, 8)
            out.append((stream << _powers(8, code)).sum(1, dtype=torch.int32).to(torch.uint8))
    return out


def _unpack(stream: Tensor, count: int, bits: int) -> Tensor:
    """`count` codes of `bits` bits each from a bitstream written by `_pack`."""
    unpacked = (stream.int()[:, None] >> _powers(8, stream)) & 1
    unpacked = unpacked.reshape(-1)[: count * bits].view(count, bits)
    return (unpacked << _powers(bits, stream)).sum(1, dtype=torch.int32)


def _powers(n: int, like: Tensor) -> Tensor:
    """0, 1, ..., n - 1 as int32 shift amounts on `like`'s device."""
    return torch.arange(n, device=like.device, dtype=torch.int32)
