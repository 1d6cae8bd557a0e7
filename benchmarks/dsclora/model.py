"""A small SPAN-style super-resolution network and DSCLoRA's ConvLoRA placement on it.

SPAN (Wan et al., 2024): a 3×3 conv head, a chain of SPAB blocks, a 3×3 conv, a pixel-shuffle
upsampler. A SPAB is three 3×3 convs with SiLU between them and a parameter-free attention:
out = (c3 + x) · (sigmoid(c3) − 0.5). As in SPAN, the input is scaled by 255 (`img_range`): with
features of order one the attention is ≈ c3·(c3 + x)/4 and the signal through the blocks vanishes
(a first version of this benchmark had that: the SPABs were dead). Two simplifications for short CPU training, the same for the
teacher and the student: the features after the last conv get the head's output added (SPAN
instead concatenates four feature maps and mixes them with a 1×1 conv), and the bicubic upsampling
of the input is added to the output, so an untrained network starts at bicubic quality.

Module paths (what ConvLoRA targets): `head`, `blocks.<i>.c1|c2|c3`, `body` (the conv before the
pixel shuffle), `up.0` (the pixel-shuffle conv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapterlab as al


class SPAB(nn.Module):
    """Three 3×3 convs (SiLU between) and SPAN's parameter-free attention, with the block input as residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c3 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.c3(F.silu(self.c2(F.silu(self.c1(x)))))
        return (out + x) * (torch.sigmoid(out) - 0.5)


class SPAN(nn.Module):
    """head → SPAB × `blocks` → body conv (+ head) → conv → pixel shuffle (+ bicubic of the input)."""

    def __init__(self, channels: int = 48, blocks: int = 4, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.img_range = (
            255.0  # SPAN's input scaling: features large enough that sigmoid(out) − 0.5 saturates
        )
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(SPAB(channels) for _ in range(blocks))
        self.body = nn.Conv2d(channels, channels, 3, padding=1)
        self.up = nn.Sequential(nn.Conv2d(channels, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        with torch.no_grad():  # start close to bicubic
            self.up[0].weight.mul_(0.1)
            self.up[0].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = self.head((x - 0.5) * self.img_range)
        f = h
        for block in self.blocks:
            f = block(f)
        out = self.up(self.body(f) + h) / self.img_range
        return out + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)


def block_names(model: SPAN) -> list[str]:
    """Paths of the SPAB blocks: the features the spatial-affinity loss compares."""
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def param_count(model: nn.Module) -> int:
    """All parameters of the model (adapters included while they are injected)."""
    return sum(p.numel() for p in model.parameters())


SPAB_CONVS = r"blocks\.\d+\.c[123]"
TAIL_CONVS = ["body", "up.0"]


@dataclass(frozen=True)
class Placement:
    """ConvLoRA ranks for DSCLoRA's two groups: every SPAB conv, and the two convs at the pixel shuffle.
    `tail` maps each tail conv to its rank (the kernel layout needs a rank per conv shape to match
    the reshape layout's parameter count). alpha = 2·r everywhere, as in DSCLoRA (r=2/α=4, r=8/α=16)."""

    mode: str
    spab: int
    tail: tuple[tuple[str, int], ...]


def dsclora_placement(mode: str = "reshape") -> Placement:
    """DSCLoRA's own ranks: r=2 in the SPAB convs, r=8 in `body` and `up.0`."""
    return Placement(mode, 2, tuple((name, 8) for name in TAIL_CONVS))


def lora_params(mode: str, conv: nn.Conv2d, r: int) -> int:
    """Trainable parameters of one ConvLoRA delta on a square-kernel, ungrouped conv."""
    c_out, c_in, k, _ = conv.weight.shape
    if mode == "reshape":  # A: (r·k)×(C_in·k), B: (C_out·k)×(r·k)
        return r * k * k * (c_in + c_out)
    return r * (c_in * k * k + c_out)  # A: r×C_in×k×k, B: C_out×r×1×1


def matched_rank(conv: nn.Conv2d, reshape_rank: int) -> int:
    """The kernel-layout rank whose parameter count is closest to the reshape layout's at `reshape_rank`."""
    target = lora_params("reshape", conv, reshape_rank)
    per_rank = lora_params("kernel", conv, 1)
    return max(1, round(target / per_rank))


def kernel_placement(model: SPAN) -> Placement:
    """Kernel-layout ranks that spend (as nearly as integer ranks allow) DSCLoRA's reshape budget, per conv."""
    ref = dsclora_placement("reshape")
    spab = matched_rank(model.blocks[0].c1, ref.spab)
    tail = tuple((name, matched_rank(model.get_submodule(name), r)) for name, r in ref.tail)
    return Placement("kernel", spab, tail)


def inject_convlora(model: SPAN, placement: Placement) -> SPAN:
    """Add ConvLoRA per `placement`: adapter "spab" on the SPAB convs and one adapter per tail conv
    ("tail_body", "tail_up_0"). All of them train (inject freezes earlier adapters, so they are
    unfrozen here); the base stays frozen."""
    al.inject(
        model,
        "convlora",
        name="spab",
        targets=SPAB_CONVS,
        r=placement.spab,
        alpha=2.0 * placement.spab,
        conv_mode=placement.mode,
    )
    for path, r in placement.tail:
        al.inject(
            model,
            "convlora",
            name="tail_" + path.replace(".", "_"),
            targets=[path],
            r=r,
            alpha=2.0 * r,
            conv_mode=placement.mode,
        )
    for name, p in model.named_parameters():
        p.requires_grad_(".deltas." in name)
    return model


def trainable(model: nn.Module) -> int:
    """Parameters that currently require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
