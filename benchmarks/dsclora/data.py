"""LR/HR pairs from scikit-image's packaged sample images (or synthetic images), and Y-channel PSNR.

- Images are RGB floats in [0, 1], 3×H×W; grey images are repeated over three channels.
- LR = bicubic downsampling of HR with antialiasing (`F.interpolate(..., antialias=True)`),
  clamped to [0, 1]; HR sides are cut to multiples of the scale first.
- Every image is split by columns: the left three quarters are for training (random HR crops with
  random flips and 90° rotations), the right quarter is held out for evaluation (centre-cropped),
  so training never sees an evaluation pixel, and both come from the same 16 photographs.
- Without scikit-image (CI), `synthetic_images` gives seeded images of smooth blobs, edges and
  stripes, so the pipeline still runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from adapterlab.errors import ConfigError

# All ship inside the scikit-image wheel (no download). `cat` is the same photo as `chelsea`, left out.
IMAGES = [
    "astronaut",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
    "chelsea",
    "brick",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
    "camera",
    "coins",
    "clock",
]
HELD_OUT = 0.25  # the right quarter of every image is evaluation data


def _to_tensor(array) -> Tensor:
    t = torch.as_tensor(array).float()
    if t.max() > 1.0:
        t = t / 255.0
    if t.dim() == 2:
        t = t.unsqueeze(-1).expand(*t.shape, 3)
    return t[..., :3].permute(2, 0, 1).contiguous()


def skimage_images(names: list[str]) -> list[Tensor]:
    """The named scikit-image sample images as 3×H×W tensors in [0, 1]."""
    from skimage import data as skdata

    images = []
    for name in names:
        loader = getattr(skdata, name, None)
        if loader is None:
            raise ConfigError(f"scikit-image has no sample image {name!r}; use one of {IMAGES}")
        images.append(_to_tensor(loader()))
    return images


def synthetic_images(n: int, size: int, seed: int) -> list[Tensor]:
    """`n` seeded size×size RGB images: random Gaussian blobs, a sharp-edged rectangle and a stripe pattern."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        img = torch.rand(3, 1, 1, generator=gen).expand(3, size, size).clone()
        for _ in range(6):
            cy, cx, s = torch.rand(3, generator=gen)
            color = torch.rand(3, 1, 1, generator=gen) - 0.5
            img += color * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.1 * s))
        y0, x0, y1, x1 = (torch.rand(4, generator=gen) * size).long().tolist()
        img[:, min(y0, y1) : max(y0, y1), min(x0, x1) : max(x0, x1)] += (
            torch.rand(3, 1, 1, generator=gen) - 0.5
        )
        angle, freq = torch.rand(2, generator=gen).tolist()
        stripes = torch.sin(
            2 * math.pi * (4 + 20 * freq) * (xx * math.cos(3 * angle) + yy * math.sin(3 * angle))
        )
        img += 0.15 * stripes
        images.append(img.clamp(0, 1))
    return images


def split(images: list[Tensor], held_out: float = HELD_OUT) -> tuple[list[Tensor], list[Tensor]]:
    """(training parts, evaluation parts): each image's columns left of 1 − `held_out`, and the rest."""
    if not 0 < held_out < 1:
        raise ConfigError(f"held_out={held_out!r} must be a fraction between 0 and 1, e.g. 0.25")
    cuts = [round(im.shape[2] * (1 - held_out)) for im in images]
    return [im[:, :, :c] for im, c in zip(images, cuts, strict=True)], [
        im[:, :, c:] for im, c in zip(images, cuts, strict=True)
    ]


def downsample(hr: Tensor, scale: int) -> Tensor:
    """Bicubic, antialiased downsampling by `scale` (B×3×H×W, sides divisible by scale), clamped to [0, 1]."""
    return F.interpolate(
        hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


class PatchSampler:
    """Seeded random LR/HR training batches: HR crops of `patch`×`patch`, flipped and rotated at random."""

    def __init__(self, images: list[Tensor], patch: int, scale: int, batch: int, seed: int) -> None:
        small = [tuple(im.shape[1:]) for im in images if min(im.shape[1:]) < patch]
        if small or patch % scale:
            raise ConfigError(
                f"patch={patch} must be a multiple of scale={scale} and fit every image "
                f"(too small: {small}); lower --patch"
            )
        self.images, self.patch, self.scale, self.batch = images, patch, scale, batch
        self.gen = torch.Generator().manual_seed(seed)

    def _crop(self) -> Tensor:
        im = self.images[int(torch.randint(len(self.images), (1,), generator=self.gen))]
        h, w = im.shape[1:]
        y = int(torch.randint(h - self.patch + 1, (1,), generator=self.gen))
        x = int(torch.randint(w - self.patch + 1, (1,), generator=self.gen))
        crop = im[:, y : y + self.patch, x : x + self.patch]
        if torch.rand(1, generator=self.gen) < 0.5:
            crop = crop.flip(-1)
        return torch.rot90(crop, int(torch.randint(4, (1,), generator=self.gen)), dims=(1, 2))

    def next(self) -> tuple[Tensor, Tensor]:
        """One (LR, HR) batch."""
        hr = torch.stack([self._crop() for _ in range(self.batch)])
        return downsample(hr, self.scale), hr


def eval_pairs(images: list[Tensor], scale: int, max_side: int) -> list[tuple[Tensor, Tensor]]:
    """(LR, HR) per image: HR centre-cropped to at most `max_side` and to multiples of `scale`."""
    pairs = []
    for im in images:
        h, w = (min(s, max_side) // scale * scale for s in im.shape[1:])
        top, left = (im.shape[1] - h) // 2, (im.shape[2] - w) // 2
        hr = im[None, :, top : top + h, left : left + w].contiguous()
        pairs.append((downsample(hr, scale), hr))
    return pairs


def rgb_to_y(img: Tensor) -> Tensor:
    """ITU-R BT.601 luma in [16/255, 235/255] of an RGB image in [0, 1] (the usual SR convention)."""
    r, g, b = img.unbind(-3)
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def psnr_y(sr: Tensor, hr: Tensor, shave: int) -> float:
    """PSNR in dB on the Y channel, `shave` border pixels removed, SR quantised to 8 bits first."""
    sr = (sr.clamp(0, 1) * 255).round() / 255
    diff = rgb_to_y(sr) - rgb_to_y(hr)
    if shave:
        diff = diff[..., shave:-shave, shave:-shave]
    mse = diff.pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
