"""DSCLoRA as the paper sets it up (issue #17): the teacher is the compact SPAN itself, trained to a
plateau; the student is that same network with ConvLoRA, so teacher and student start identical.

Question: does ConvLoRA tuning with DSCLoRA's loss raise the held-out PSNR of an already-converged
compact SR network (the paper: "improves PSNR and SSIM over SPAN while maintaining its
efficiency"), and does the spatial-affinity term add to that?

Setup (CPU, fp32, 1 intra-op thread, no download; x2 SR; data, PSNR and network from data.py and
model.py, as in run.py; held-out images centre-cropped to ≤ 192 px):
- Pre-training: SPAN, 16 channels, 4 SPABs, L1(SR, HR), Adam 2e-3 with a cosine schedule to zero,
  6,000 steps of 8 HR crops of 32×32 — the held-out PSNR during it is recorded (`pretrain_curve`)
  to show the plateau. This network is the teacher and the base of every student (seed 0).
- Variants, each 300 steps (`tune_steps`) from the plateau network (Adam 5e-4, cosine), seeds 0, 1, 2
  (a seed fixes the adapter initialisation and the batch order, shared by all variants, so
  differences between variants are paired by seed):
  `continued`       all weights, L1(SR, HR): plain continued training (the control for "more training");
  `convlora`        ConvLoRA (DSCLoRA's placement and reshape layout), L1(SR, HR);
  `convlora_pixel`  + L1(SR, SR_teacher);
  `convlora_affinity`  ConvLoRA, L1(SR, HR) + λ3 · affinity (no pixel KD): the affinity term alone;
  `dsclora`         ConvLoRA, L1(SR, HR) + L1(SR, SR_teacher) + λ3 · Σ_blocks mean|A_s − A_t| on the four SPAB outputs, λ3 = 0.08: FAKD's
                    λ = 0.5, 0.5, 10 were set for pixels in [0, 255]; on [0, 1] pixels the two L1
                    terms are 255× smaller, so 1, 1, 10·2/255 ≈ 0.08 is the same balance;
  `dsclora_wrong_teacher`  the control: as `dsclora`, but the affinity target comes from an untrained
                    SPAN of the same shape. A live affinity term must pull the student towards that
                    net's affinities and away from the teacher's (and cost PSNR); a broken one
                    (no gradient, wrong features, too weak to matter at λ3 = 0.08) leaves it
                    equal to `dsclora`.
- Per variant and seed: held-out PSNR-Y; the affinity distance to the teacher (Σ over the four SPAB
  outputs of mean|A_s − A_t|) on a fixed batch of held-out LR crops; the relative change of the
  merged weights; the first and last losses. Merge check on `dsclora` seed 0.

    python benchmarks/dsclora/plateau.py         # benchmarks/results/dsclora_plateau.json
    python benchmarks/dsclora/plateau.py --tiny  # smoke run on synthetic images (seconds)
    python benchmarks/plots.py                   # docs/img/dsclora_plateau.png from the JSON
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import adapterlab as al  # noqa: E402
from dsclora import data  # noqa: E402
from dsclora.model import SPAN, block_names, dsclora_placement, inject_convlora, param_count, trainable  # noqa: E402
from dsclora.run import LossFn, dsclora_loss, evaluate, l1_loss, train  # noqa: E402

VARIANTS = (
    "continued",
    "convlora",
    "convlora_pixel",
    "convlora_affinity",
    "dsclora",
    "dsclora_wrong_teacher",
)
# (name, minuend, subtrahend): the paired differences that answer the question
CONTRASTS = (
    ("dsclora_vs_base", "dsclora", None),
    ("dsclora_vs_continued", "dsclora", "continued"),
    ("convlora_vs_continued", "convlora", "continued"),
    ("pixel_kd_effect", "convlora_pixel", "convlora"),
    ("affinity_effect", "dsclora", "convlora_pixel"),
    ("affinity_alone_effect", "convlora_affinity", "convlora"),
    ("control_wrong_teacher", "dsclora_wrong_teacher", "dsclora"),
)


@dataclass
class Setup:
    """Everything that decides a run's numbers."""

    scale: int = 2
    channels: int = 16
    blocks: int = 4
    patch: int = 32  # HR crop side (LR 16×16: the affinity is 256×256 per map)
    batch: int = 8
    pretrain_steps: int = 6000
    lr_pretrain: float = 2e-3
    pretrain_evals: int = 12
    tune_steps: int = 300
    lr_tune: float = 5e-4
    lambdas: tuple[float, float, float] = (1.0, 1.0, 0.08)  # L1(SR,HR), L1(SR,SR_t), affinity
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    wrong_teacher_seed: int = 12345
    eval_side: int = 192
    affinity_batch: int = 16  # held-out LR crops for the affinity distance
    images: str = "skimage"  # or "synthetic" (no scikit-image needed)


TINY = Setup(
    channels=4,
    blocks=2,
    patch=16,
    batch=2,
    pretrain_steps=6,
    pretrain_evals=2,
    tune_steps=3,
    eval_side=32,
    affinity_batch=2,
    images="synthetic",
)


def load_images(setup: Setup) -> tuple[list[Tensor], list[Tensor]]:
    """(training images, held-out images): disjoint parts of the same photographs."""
    if setup.images == "skimage":
        return data.split(data.skimage_images(data.IMAGES))
    if setup.images == "synthetic":
        return data.split(data.synthetic_images(4, 64, seed=0))
    raise al.ConfigError(f"images={setup.images!r}; use 'skimage' or 'synthetic'")


@torch.no_grad()
def affinity_distance(student: nn.Module, teacher: nn.Module, lr: Tensor) -> float:
    """Σ over the SPAB outputs of mean|A_student − A_teacher| on the LR batch `lr`."""
    with al.losses.capture(teacher, block_names(teacher)) as t_feats:
        teacher(lr)
    with al.losses.capture(student, block_names(student)) as s_feats:
        student(lr)
    return float(al.losses.spatial_affinity_loss(list(s_feats.values()), list(t_feats.values())))


def relative_change(model: nn.Module, base: nn.Module) -> float:
    """‖W_merged − W_base‖ / ‖W_base‖ over all weights (adapters merged into a copy first)."""
    merged = al.unload(copy.deepcopy(model), merge=True) if al.adapters(model) else model
    ref = dict(base.named_parameters())
    num = sum((p.detach() - ref[n].detach()).pow(2).sum() for n, p in merged.named_parameters())
    den = sum(p.detach().pow(2).sum() for p in ref.values())
    return float((num / den).sqrt())


def make_student(variant: str, teacher: SPAN, seed: int) -> SPAN:
    """A copy of the plateau network: all weights train (`continued`), or ConvLoRA per DSCLoRA."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher).train()
    if variant == "continued":
        return student.requires_grad_(True)
    return inject_convlora(student, dsclora_placement("reshape"))


def variant_loss(variant: str, teacher: SPAN, wrong: SPAN, setup: Setup) -> LossFn:
    """The loss a variant trains with."""
    l_rec, l_ts, l_ad = setup.lambdas
    if variant in ("continued", "convlora"):
        return l1_loss
    if variant == "convlora_pixel":
        return dsclora_loss(teacher, (l_rec, l_ts, 0.0), teacher)
    if variant == "convlora_affinity":
        return dsclora_loss(teacher, (l_rec, 0.0, l_ad), teacher)
    if variant == "dsclora":
        return dsclora_loss(teacher, setup.lambdas, teacher)
    if variant == "dsclora_wrong_teacher":
        return dsclora_loss(teacher, setup.lambdas, wrong)
    raise al.ConfigError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def pretrain(setup: Setup, images: list[Tensor], pairs: list[tuple[Tensor, Tensor]]) -> tuple[SPAN, list]:
    """The compact SPAN trained from scratch to a plateau; returns it and its held-out PSNR curve."""
    torch.manual_seed(0)
    model = SPAN(setup.channels, setup.blocks, setup.scale)
    sampler = data.PatchSampler(images, setup.patch, setup.scale, setup.batch, seed=0)
    curve: list[tuple[int, float]] = []
    train(
        model,
        sampler,
        setup.pretrain_steps,
        setup.lr_pretrain,
        l1_loss,
        lambda step: curve.append((step, statistics.mean(evaluate(model, pairs, setup.scale)))),
        setup.pretrain_evals,
    )
    return model.eval().requires_grad_(False), curve


def tune(variant: str, teacher: SPAN, wrong: SPAN, setup: Setup, ctx: dict, seed: int) -> tuple[SPAN, dict]:
    """Train one variant from the plateau network; returns the student (unmerged) and its record."""
    student = make_student(variant, teacher, seed)
    sampler = data.PatchSampler(ctx["train"], setup.patch, setup.scale, setup.batch, seed=1000 + seed)
    start = time.perf_counter()
    losses = train(
        student, sampler, setup.tune_steps, setup.lr_tune, variant_loss(variant, teacher, wrong, setup)
    )
    seconds = time.perf_counter() - start
    student.eval()
    psnr = evaluate(student, ctx["pairs"], setup.scale)
    return student, {
        "psnr": statistics.mean(psnr),
        "psnr_per_image": psnr,
        "affinity_to_teacher": affinity_distance(student, teacher, ctx["affinity_lr"]),
        "affinity_to_wrong_teacher": affinity_distance(student, wrong, ctx["affinity_lr"]),
        "weight_change": relative_change(student, teacher),
        "trainable_params": trainable(student),
        "first_loss": losses[0],
        "last_loss": statistics.mean(losses[-20:]),
        "train_seconds": seconds,
    }


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "per_seed": values,
    }


def contrasts(records: dict[str, list[dict]], base_psnr: float) -> dict[str, dict]:
    """The paired (same seed) PSNR differences in CONTRASTS, for the variants that ran."""
    out = {}
    for name, a, b in CONTRASTS:
        if a not in records or (b is not None and b not in records):
            continue
        diffs = [
            r["psnr"] - (base_psnr if b is None else records[b][i]["psnr"]) for i, r in enumerate(records[a])
        ]
        out[name] = {"minuend": a, "subtrahend": b or "plateau_base", **spread(diffs)}
    return out


@torch.no_grad()
def merge_check(student: SPAN, teacher: SPAN, lr: Tensor) -> dict:
    """Merged student: the plateau network's size and module types, the unmerged student's output."""
    out = student(lr)
    merged = al.unload(copy.deepcopy(student), merge=True).eval()
    return {
        "base_params": param_count(teacher),
        "unmerged_params": param_count(student),
        "merged_params": param_count(merged),
        "same_modules_as_base": [type(m).__name__ for m in merged.modules()]
        == [type(m).__name__ for m in teacher.modules()],
        "merged_vs_unmerged_max_abs": (merged(lr) - out).abs().max().item(),
    }


def run(setup: Setup, log: Callable[[str], None] = print) -> dict:
    """The whole reproduction; returns the results (writes nothing)."""
    unknown = [v for v in setup.variants if v not in VARIANTS]
    if unknown:
        raise al.ConfigError(f"unknown variants {unknown}; use some of {VARIANTS}")
    begin, cpu = time.perf_counter(), time.process_time()
    train_images, eval_images = load_images(setup)
    pairs = data.eval_pairs(eval_images, setup.scale, setup.eval_side)
    affinity_lr = data.PatchSampler(eval_images, setup.patch, setup.scale, setup.affinity_batch, 4242).next()[
        0
    ]
    ctx = {"train": train_images, "pairs": pairs, "affinity_lr": affinity_lr}
    teacher, curve = pretrain(setup, train_images, pairs)
    torch.manual_seed(setup.wrong_teacher_seed)
    wrong = SPAN(setup.channels, setup.blocks, setup.scale).eval().requires_grad_(False)
    base_psnr = evaluate(teacher, pairs, setup.scale)
    bicubic = [
        data.psnr_y(
            F.interpolate(lr, scale_factor=setup.scale, mode="bicubic", align_corners=False), hr, setup.scale
        )
        for lr, hr in pairs
    ]
    log(f"bicubic {statistics.mean(bicubic):.3f} dB  plateau base {statistics.mean(base_psnr):.3f} dB")
    log("pretrain curve " + "  ".join(f"{s}:{p:.3f}" for s, p in curve))
    records: dict[str, list[dict]] = {v: [] for v in setup.variants}
    merge = None
    for seed in setup.seeds:
        for variant in setup.variants:
            student, rec = tune(variant, teacher, wrong, setup, ctx, seed)
            records[variant].append(rec)
            log(
                f"seed {seed} {variant:22s} {rec['psnr']:.4f} dB  affinity→teacher "
                f"{rec['affinity_to_teacher']:.2e}  Δw {rec['weight_change']:.2e}  {rec['train_seconds']:.0f} s"
            )
            if merge is None and variant.startswith("dsclora"):
                merge = merge_check(student, teacher, pairs[0][0])
    base = statistics.mean(base_psnr)
    return {
        "setup": dataclasses.asdict(setup),
        "threads": torch.get_num_threads(),
        "psnr_metric": f"Y channel (BT.601), {setup.scale}-pixel border shaved, SR rounded to 8 bits, "
        f"mean over {len(pairs)} held-out images",
        "fixed_psnr": {
            "bicubic": {"mean": statistics.mean(bicubic), "per_image": bicubic},
            "plateau_base": {"mean": base, "per_image": base_psnr},
        },
        "pretrain_curve": curve,
        "params": {
            "base": param_count(teacher),
            "trainable": {v: records[v][0]["trainable_params"] for v in records},
        },
        "psnr": {v: spread([r["psnr"] for r in recs]) for v, recs in records.items()},
        "affinity_to_teacher": {
            v: spread([r["affinity_to_teacher"] for r in recs]) for v, recs in records.items()
        },
        "contrasts": contrasts(records, base),
        "records": records,
        "merge": merge,
        "seconds": time.perf_counter() - begin,
        "cpu_seconds": time.process_time() - cpu,
    }


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run on synthetic images")
    parser.add_argument("--seeds", type=int, nargs="+", help="tuning seeds (default 0 1 2)")
    parser.add_argument("--tune-steps", type=int)
    parser.add_argument("--lr-tune", type=float)
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/dsclora_plateau[_tiny].json)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = copy.deepcopy(TINY if args.tiny else Setup())
    if args.seeds:
        setup.seeds = tuple(args.seeds)
    if args.tune_steps is not None:
        setup.tune_steps = args.tune_steps
    if args.lr_tune is not None:
        setup.lr_tune = args.lr_tune
    out = args.out or ROOT / f"benchmarks/results/dsclora_plateau{'_tiny' if args.tiny else ''}.json"
    results = run(setup)
    results["command"] = "python benchmarks/dsclora/plateau.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
