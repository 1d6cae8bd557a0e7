"""Adapters on a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) or tensor
parallelism, whose parameters are `DTensor`s: each rank holds a shard. Saving gathers the adapter's
tensors (only those: never the base weights) to whole tensors on every rank, a collective that
every rank must join in the same order, and rank 0 alone writes. docs/distributed.md#fsdp2.
"""

from __future__ import annotations

from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    """Whether `t` is a `torch.distributed.tensor.DTensor` (False where torch has no DTensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def whole(t: Tensor) -> Tensor:
    """`t` itself, or, for a DTensor, the whole tensor gathered from every rank (autograd flows
    back to this rank's shard). A collective: every rank must call it, in the same order."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def writer_rank() -> bool:
    """Whether this process writes a gathered adapter: rank 0 of the default process group, or
    any process outside one."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
