"""Distillation supervision used with ConvLoRA (DSCLoRA, after FAKD): spatial-affinity loss.

For a feature map F ∈ R^{B×C×H×W}, each spatial position is normalised over channels
(F̂ = F / (‖F‖₂ + eps), eps = 1e-7) and the affinity A = F̂ᵀF̂ ∈ R^{B×HW×HW} relates every position
to every other. The loss is Σ_layers mean |A_student − A_teacher|.

HW×HW grows fast (a 64×64 map gives 16.8 M entries per sample), so the affinity is never built in
one piece: rows are taken `chunk` at a time, and each chunk is recomputed in backward
(activation checkpointing), so peak memory is B·chunk·HW, not B·HW·HW.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError, TargetError, closest


def _normalised(f: Tensor, eps: float) -> Tensor:
    flat = f.flatten(2)  # B × C × HW
    return flat / (flat.norm(dim=1, keepdim=True) + eps)


def _chunk_l1(s: Tensor, t: Tensor, start: int, stop: int) -> Tensor:
    rows_s = s[:, :, start:stop].transpose(1, 2) @ s  # B × chunk × HW
    rows_t = t[:, :, start:stop].transpose(1, 2) @ t
    return (rows_s - rows_t).abs().sum()


def affinity_l1(student: Tensor, teacher: Tensor, chunk: int = 1024, eps: float = 1e-7) -> Tensor:
    """mean |A_student − A_teacher| for one pair of B×C×H×W maps (C may differ between them)."""
    if student.dim() < 3 or student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ConfigError(
            f"feature maps must share batch and spatial size: student {tuple(student.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ConfigError(f"chunk={chunk!r} must be a positive integer (rows of the affinity per step)")
    s, t = _normalised(student, eps), _normalised(teacher, eps)
    hw = s.shape[2]
    total = s.new_zeros(())
    for start in range(0, hw, chunk):
        stop = min(start + chunk, hw)
        if torch.is_grad_enabled() and (s.requires_grad or t.requires_grad):
            total = total + checkpoint(_chunk_l1, s, t, start, stop, use_reentrant=False)
        else:
            total = total + _chunk_l1(s, t, start, stop)
    return total / (s.shape[0] * hw * hw)


def spatial_affinity_loss(
    student_feats: Sequence[Tensor] | Mapping[str, Tensor],
    teacher_feats: Sequence[Tensor] | Mapping[str, Tensor],
    chunk: int = 1024,
    eps: float = 1e-7,
) -> Tensor:
    """Σ over layers of mean |A_student − A_teacher| (compute the teacher's maps without gradient)."""
    if isinstance(student_feats, Mapping) and isinstance(teacher_feats, Mapping):
        if student_feats.keys() != teacher_feats.keys():
            raise ConfigError(
                f"student layers {sorted(student_feats)} differ from teacher layers {sorted(teacher_feats)}"
            )
        if not student_feats:
            raise ConfigError("got no student or teacher maps; pass at least one layer's maps")
        pairs = [(student_feats[k], teacher_feats[k]) for k in student_feats]
    elif not isinstance(student_feats, Mapping) and not isinstance(teacher_feats, Mapping):
        if len(student_feats) != len(teacher_feats) or not student_feats:
            raise ConfigError(
                f"got {len(student_feats)} student and {len(teacher_feats)} teacher maps; "
                "pass one teacher map per student map"
            )
        pairs = list(zip(student_feats, teacher_feats, strict=True))
    else:
        raise ConfigError("pass student and teacher features both as lists or both as dicts")
    return functools.reduce(operator.add, (affinity_l1(s, t, chunk, eps) for s, t in pairs))


@contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """`with capture(model, ["body.0", "body.1"]) as feats: model(x)` fills `feats[name]` with each
    named module's output (forward hooks, removed on exit)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise TargetError(
            "no module named " + "; ".join(f"{n!r} (closest: {closest(n, modules)})" for n in missing)
        )
    feats: dict[str, Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: feats.__setitem__(n, out)) for n in names
    ]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()
