"""Hot-swapping LoRA factors in place (hotswap.py calls these through `LoRAConfig`): zero-padding
to a larger rank, and a file's factors padded and rescaled into an adapter's."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import HotswapError
from ..layer import Delta


@torch.no_grad()
def pad_factors(deltas: list[Delta], r: int, max_rank: int, padded: Any) -> None:
    """Every delta's A rows and B columns zero-padded from rank `r` to `max_rank`; config `padded`."""
    for delta in deltas:
        inner = delta.lora_A.weight.shape[0] // r * max_rank
        for factor, dim in ((delta.lora_A, 0), (delta.lora_B, 1)):
            w = factor.weight
            shape = list(w.shape)
            shape[dim] = inner
            new = w.new_zeros(shape)
            new.narrow(dim, 0, w.shape[dim]).copy_(w)
            w.data = new
            w.grad = None
        delta.config = padded


def factor_values(
    where: str, path: str, delta: Delta, own: dict[str, Tensor], loaded_r: int, loaded_scaling: float
) -> list[tuple[Tensor, Tensor]]:
    """(target, value) pairs: the file's A, B (`own`, of rank `loaded_r` and scaling
    `loaded_scaling`) padded with zeros to the delta's rank, B times loaded_scaling / delta.scaling."""
    a, b = delta.lora_A.weight, delta.lora_B.weight
    new_a, new_b = own["lora_A.weight"], own["lora_B.weight"]
    rank, new_rank = a.shape[0], new_a.shape[0]
    fits = (
        new_a.dim() == a.dim()
        and new_b.dim() == b.dim()
        and new_a.shape[1:] == a.shape[1:]
        and new_b.shape[0] == b.shape[0]
        and new_b.shape[2:] == b.shape[2:]
        and new_b.shape[1] == new_rank
        if delta.refactorable
        else new_a.shape == a.shape and new_b.shape == b.shape
    )
    if not fits:
        raise HotswapError(
            f"{where}: {path!r} has lora_A {list(new_a.shape)} and lora_B {list(new_b.shape)} in "
            f"the file; the adapter has {list(a.shape)} and {list(b.shape)} (another layer shape or "
            "layout)"
        )
    if not delta.refactorable:  # equal shapes (checked above): copied, B rescaled to our scaling
        return [(a, new_a), (b, new_b.to(torch.float64) * (loaded_scaling / delta.scaling))]
    if new_rank > rank:
        raise HotswapError(
            f"{where}: {path!r} has rank r={loaded_r} in the file, above the adapter's "
            f"r={delta.config.r}; call al.prepare_hotswap(model, max_rank={loaded_r}) (or larger) "
            "before compiling"
        )
    pad_a = a.new_zeros(a.shape)
    pad_a[:new_rank] = new_a
    pad_b = b.new_zeros(b.shape)
    pad_b[:, :new_rank] = new_b.to(torch.float64) * (loaded_scaling / delta.scaling)
    return [(a, pad_a), (b, pad_b)]
