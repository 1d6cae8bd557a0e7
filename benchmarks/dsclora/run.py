"""DSCLoRA at small scale: distil a wide SPAN teacher into a narrow SPAN student through ConvLoRA.

Setup (CPU, fp32, 1 intra-op thread, no download; x2 super-resolution):
- Data (data.py): 16 scikit-image sample photos; random 48×48 HR crops (flips, rotations) from the
  left three quarters of each, LR by antialiased bicubic downsampling. PSNR on the Y channel
  (BT.601, 2-pixel border shaved, SR rounded to 8 bits), mean over the held-out right quarters,
  each centre-cropped to at most 256 px.
- Teacher: SPAN with 48 channels, 4 SPABs, 2000 steps from scratch (L1, Adam 2e-3, cosine schedule,
  batches of 8). Student base: SPAN with 24 channels (`--student-channels`), 4 SPABs, trained
  briefly (300 steps) the same way. Both seed 0.
- From the student base, each variant trains 200 steps (`--tune-steps`; Adam 1e-3, cosine), with
  seeds 0 and 1 (`--seeds`: the adapter init and the batch order):
  `full_ft`              every student parameter, L1(SR, HR) — the control: just more training;
  `full_ft_kd`           every student parameter, the DSCLoRA loss;
  `reshape`              ConvLoRA, reshape layout (DSCLoRA's), L1(SR, HR) only;
  `reshape_kd_pixel`     ConvLoRA reshape, L1(SR, HR) + L1(SR, SR_teacher), no affinity term;
  `reshape_kd`           ConvLoRA reshape, the DSCLoRA loss = DSCLoRA (λ = 1, 1, 1);
  `reshape_kd_fakd`      the same with FAKD's weights λ = 0.5, 0.5, 10 (DSCLoRA's own are unconfirmed);
  `reshape_kd_balanced`  λ = 1, 1, 1e-4: the affinity's gradient on the SPAB adapters is ~10⁴ times
                         the pixel loss's (measured at the start, `gradient_balance` in the JSON),
                         so at λ3 ≥ 1 those adapters train on the affinity alone;
  `kernel`, `kernel_kd`  ConvLoRA, kernel layout (PEFT's), at the reshape layout's parameter budget.
  DSCLoRA loss = λ1·L1(SR, HR) + λ2·L1(SR, SR_teacher) + λ3·Σ_blocks mean|A_s − A_t|, the spatial
  affinity of the four SPAB outputs (student 24 and teacher 48 channels: the affinity is HW×HW).
- ConvLoRA placement (model.py): r=2/α=4 in the 12 SPAB convs, r=8/α=16 in `body` (the conv before
  the pixel shuffle) and `up.0` (the pixel-shuffle conv). The kernel layout gets, per conv, the rank
  whose parameter count is nearest the reshape layout's (integer ranks: totals differ slightly).
- The adapted student is merged (`al.unload(merge=True)`): its parameter count must equal the base's
  and its output the unmerged student's. Forward latency of base, merged and unmerged students on
  one 128×128 LR image, interleaved round by round; ratios of per-round times, median over rounds.

    python benchmarks/dsclora/run.py          # benchmarks/results/dsclora.json, docs/img/dsclora.png
    python benchmarks/dsclora/run.py --quick  # a smoke run: dsclora_quick.json, docs/img/dsclora_quick.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
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

import adapterlab as al
from dsclora import data
from dsclora import model as model_module
from dsclora.model import (
    SPAN,
    block_names,
    dsclora_placement,
    inject_convlora,
    kernel_placement,
    param_count,
    trainable,
)

VARIANTS = [
    "full_ft",
    "full_ft_kd",
    "reshape",
    "reshape_kd_pixel",
    "reshape_kd",
    "reshape_kd_fakd",
    "reshape_kd_balanced",
    "kernel",
    "kernel_kd",
]


@dataclass
class Setup:
    """Everything that decides a run's numbers."""

    scale: int = 2
    teacher_channels: int = 48
    student_channels: int = 24
    blocks: int = 4
    patch: int = 48  # HR crop side
    batch: int = 8
    teacher_steps: int = 2000
    base_steps: int = 300
    tune_steps: int = 200
    lr_pretrain: float = 2e-3
    lr_tune: float = 1e-3
    lambdas: tuple[float, float, float] = (1.0, 1.0, 1.0)  # L1(SR,HR), L1(SR,SR_t), affinity
    fakd_lambdas: tuple[float, float, float] = (0.5, 0.5, 10.0)  # FAKD's weights, for `*_kd_fakd`
    balanced_lambdas: tuple[float, float, float] = (
        1.0,
        1.0,
        1e-4,
    )  # for `*_kd_balanced`, see gradient_balance
    seeds: tuple[int, ...] = (0, 1)
    variants: tuple[str, ...] = tuple(VARIANTS)
    eval_side: int = 256
    curve_points: int = 5  # evaluations during tuning, for the plot
    latency_side: int = 128
    latency_rounds: int = 31
    images: str = "skimage"  # or "synthetic" (no scikit-image needed)


QUICK = Setup(
    teacher_steps=60, base_steps=30, tune_steps=20, seeds=(0,), eval_side=96, curve_points=2, latency_rounds=5
)


def load_images(setup: Setup) -> tuple[list[Tensor], list[Tensor]]:
    """Training and evaluation images (disjoint)."""
    if setup.images == "skimage":
        return data.split(data.skimage_images(data.IMAGES))
    if setup.images == "synthetic":
        return data.split(data.synthetic_images(4, 96, seed=0))
    raise al.ConfigError(f"images={setup.images!r}; use 'skimage' or 'synthetic'")


# -- losses -----------------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def l1_loss(model: nn.Module, lr: Tensor, hr: Tensor) -> Tensor:
    """L1(SR, HR)."""
    return F.l1_loss(model(lr), hr)


def dsclora_loss(
    teacher: nn.Module, lambdas: tuple[float, float, float], affinity_teacher: nn.Module | None = None
) -> LossFn:
    """λ1·L1(SR, HR) + λ2·L1(SR, SR_teacher) + λ3·spatial affinity of the SPAB outputs (λ3 = 0: no
    capture), the affinity target taken from `affinity_teacher` (default: the teacher itself, read
    in the same forward; plateau.py's control passes an untrained net)."""
    l_rec, l_ts, l_ad = lambdas
    source = teacher if affinity_teacher is None else affinity_teacher

    def loss(student: nn.Module, lr: Tensor, hr: Tensor) -> Tensor:
        with torch.no_grad(), al.losses.capture(source, block_names(source)) as t_feats:
            t_sr = teacher(lr)
            if l_ad and source is not teacher:
                source(lr)
        if not l_ad:
            sr = student(lr)
            return l_rec * F.l1_loss(sr, hr) + l_ts * F.l1_loss(sr, t_sr)
        with al.losses.capture(student, block_names(student)) as s_feats:
            sr = student(lr)
        affinity = al.losses.spatial_affinity_loss(list(s_feats.values()), list(t_feats.values()))
        return l_rec * F.l1_loss(sr, hr) + l_ts * F.l1_loss(sr, t_sr) + l_ad * affinity

    return loss


# -- training and evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, pairs: list[tuple[Tensor, Tensor]], scale: int) -> list[float]:
    """Y-channel PSNR (dB) per evaluation image."""
    model.eval()
    scores = [data.psnr_y(model(lr), hr, shave=scale) for lr, hr in pairs]
    model.train()
    return scores


def train(
    model: nn.Module,
    sampler: data.PatchSampler,
    steps: int,
    lr: float,
    loss_fn: LossFn,
    on_checkpoint: Callable[[int], None] | None = None,
    checkpoints: int = 0,
) -> list[float]:
    """Adam with a cosine schedule on the parameters that require grad; returns the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    marks = {round(steps * (i + 1) / checkpoints) for i in range(checkpoints)} if checkpoints else set()
    losses = []
    model.train()
    for step in range(1, steps + 1):
        lr_img, hr_img = sampler.next()
        loss = loss_fn(model, lr_img, hr_img)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_checkpoint and step in marks:
            on_checkpoint(step)
    return losses


def pretrain(
    channels: int, steps: int, setup: Setup, images: list[Tensor], seed: int, cache: Path | None = None
) -> SPAN:
    """A SPAN trained from scratch on L1(SR, HR); with `cache`, its weights are reused from (or saved
    to) a file named after everything that decides them."""
    torch.manual_seed(seed)
    model = SPAN(channels, setup.blocks, setup.scale)
    code = hashlib.sha1(Path(model_module.__file__).read_bytes()).hexdigest()[
        :8
    ]  # the architecture's version
    key = (
        f"span_c{channels}_b{setup.blocks}_x{setup.scale}_steps{steps}_p{setup.patch}_bs{setup.batch}"
        f"_lr{setup.lr_pretrain}_{setup.images}_seed{seed}_{code}.pt"
    )
    if cache is not None and (cache / key).exists():
        model.load_state_dict(torch.load(cache / key, weights_only=True))
        return model.eval()
    sampler = data.PatchSampler(images, setup.patch, setup.scale, setup.batch, seed=seed)
    train(model, sampler, steps, setup.lr_pretrain, l1_loss)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache / key)
    return model.eval()


def make_student(variant: str, base: SPAN, seed: int) -> SPAN:
    """A copy of the base, set up for `variant`: all parameters train, or ConvLoRA in one layout."""
    torch.manual_seed(seed)
    student = copy.deepcopy(base).train()
    if variant.startswith("full_ft"):
        student.requires_grad_(True)
        return student
    layout = variant.split("_")[0]
    placement = dsclora_placement("reshape") if layout == "reshape" else kernel_placement(student)
    return inject_convlora(student, placement)


def variant_loss(variant: str, teacher: SPAN, setup: Setup) -> LossFn:
    """The loss a variant trains with."""
    if variant.endswith("_kd_pixel"):
        return dsclora_loss(teacher, (setup.lambdas[0], setup.lambdas[1], 0.0))
    if variant.endswith("_kd_fakd"):
        return dsclora_loss(teacher, setup.fakd_lambdas)
    if variant.endswith("_kd_balanced"):
        return dsclora_loss(teacher, setup.balanced_lambdas)
    if variant.endswith("_kd"):
        return dsclora_loss(teacher, setup.lambdas)
    return l1_loss


def tune(
    variant: str,
    base: SPAN,
    teacher: SPAN,
    setup: Setup,
    images: list[Tensor],
    pairs: list[tuple[Tensor, Tensor]],
    seed: int,
) -> tuple[SPAN, dict]:
    """Train one variant from the base; returns the (unmerged) student and its record."""
    student = make_student(variant, base, seed)
    sampler = data.PatchSampler(images, setup.patch, setup.scale, setup.batch, seed=1000 + seed)
    curve: list[tuple[int, float]] = [(0, statistics.mean(evaluate(student, pairs, setup.scale)))]
    start = time.perf_counter()
    losses = train(
        student,
        sampler,
        setup.tune_steps,
        setup.lr_tune,
        variant_loss(variant, teacher, setup),
        lambda step: curve.append((step, statistics.mean(evaluate(student, pairs, setup.scale)))),
        setup.curve_points,
    )
    seconds = time.perf_counter() - start
    psnr = evaluate(student, pairs, setup.scale)
    record = {
        "psnr_per_image": psnr,
        "psnr": statistics.mean(psnr),
        "trainable_params": trainable(student),
        "train_seconds": seconds,
        "first_loss": losses[0] if losses else None,
        "last_loss": statistics.mean(losses[-10:]) if losses else None,
        "curve": curve,
    }
    return student, record


def gradient_balance(base: SPAN, teacher: SPAN, setup: Setup, images: list[Tensor]) -> dict:
    """Per SPAB-adapter factor of a fresh reshape-layout student (B drawn N(0, 1e-3) so that A gets
    gradients too), the ratio ‖∇ affinity‖ / ‖∇ L1(SR, HR)‖ and ‖∇ L1(SR, SR_t)‖ / ‖∇ L1(SR, HR)‖
    on one training batch: min, median, max."""
    student = make_student("reshape_kd", base, seed=0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad and n.startswith("blocks.")]
    lr_img, hr_img = data.PatchSampler(images, setup.patch, setup.scale, setup.batch, seed=999).next()
    norms = {}
    for term, lambdas in {"rec": (1.0, 0.0, 0.0), "ts": (0.0, 1.0, 0.0), "ad": (0.0, 0.0, 1.0)}.items():
        student.zero_grad()
        dsclora_loss(teacher, lambdas)(student, lr_img, hr_img).backward()
        norms[term] = [p.grad.norm().item() for _, p in named]
    out = {}
    for term in ("ad", "ts"):
        ratios = sorted(a / r for a, r in zip(norms[term], norms["rec"], strict=True))
        out[f"{term}_over_rec"] = {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]}
    return out


# -- merge check and latency ------------------------------------------------------------------------


@torch.no_grad()
def merge_check(student: SPAN, base: SPAN, pairs: list[tuple[Tensor, Tensor]]) -> tuple[SPAN, dict]:
    """Merge and unload a ConvLoRA student; compare its size and output with the unmerged student's."""
    student.eval()
    lr = pairs[0][0]
    unmerged_out = student(lr)
    unmerged_params = param_count(student)
    merged = al.unload(copy.deepcopy(student), merge=True).eval()
    diff = (merged(lr) - unmerged_out).abs().max().item()
    return merged, {
        "base_params": param_count(base),
        "unmerged_params": unmerged_params,
        "merged_params": param_count(merged),
        "merged_vs_unmerged_max_abs": diff,
        "same_modules_as_base": [type(m).__name__ for m in merged.modules()]
        == [type(m).__name__ for m in base.modules()],
    }


@torch.no_grad()
def latency(models: dict[str, nn.Module], side: int, rounds: int) -> dict:
    """Per-round forward times of each model on one side×side LR image, interleaved (the order
    reversed every other round); median over rounds of each model's time and of its ratio to the
    first model's time in the same round."""
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    for m in models.values():
        m.eval()(x)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models.items())
    for i in range(rounds):
        for name, m in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - start)
    ref = next(iter(models))
    return {
        "side": side,
        "rounds": rounds,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "median_ratio_vs_" + ref: {
            k: statistics.median(a / b for a, b in zip(v, times[ref], strict=True)) for k, v in times.items()
        },
    }


# -- the run ----------------------------------------------------------------------------------------


def summarise(records: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean, standard deviation (n−1; 0 for one seed) and per-seed PSNR per variant."""
    out = {}
    for variant, recs in records.items():
        vals = [r["psnr"] for r in recs]
        out[variant] = {
            "mean": statistics.mean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "per_seed": vals,
        }
    return out


def run(setup: Setup, log: Callable[[str], None] = print, cache: Path | None = None) -> dict:
    """The whole reproduction; returns the results (no files written but the optional weight cache)."""
    begin = time.perf_counter()
    train_images, eval_images = load_images(setup)
    pairs = data.eval_pairs(eval_images, setup.scale, setup.eval_side)
    teacher = pretrain(setup.teacher_channels, setup.teacher_steps, setup, train_images, seed=0, cache=cache)
    base = pretrain(setup.student_channels, setup.base_steps, setup, train_images, seed=0, cache=cache)
    bicubic = [
        data.psnr_y(
            F.interpolate(lr, scale_factor=setup.scale, mode="bicubic", align_corners=False), hr, setup.scale
        )
        for lr, hr in pairs
    ]
    fixed = {
        "bicubic": bicubic,
        "teacher": evaluate(teacher, pairs, setup.scale),
        "student_base": evaluate(base, pairs, setup.scale),
    }
    log("  ".join(f"{k} {statistics.mean(v):.3f} dB" for k, v in fixed.items()))
    balance = gradient_balance(base, teacher, setup, train_images)
    log(
        f"gradient ratio on SPAB adapters, affinity / L1(SR,HR): median {balance['ad_over_rec']['median']:.3g}"
    )
    records: dict[str, list[dict]] = {v: [] for v in setup.variants}
    kept: dict[str, SPAN] = {}
    for seed in setup.seeds:
        for variant in setup.variants:
            student, rec = tune(variant, base, teacher, setup, train_images, pairs, seed)
            records[variant].append(rec)
            log(
                f"seed {seed} {variant:19s} {rec['psnr']:.3f} dB  trainable {rec['trainable_params']:,}  "
                f"{rec['train_seconds']:.0f} s"
            )
            if seed == setup.seeds[0] and variant in ("reshape_kd", "kernel_kd"):
                kept[variant] = student
    merges, merged_models = {}, {}
    for variant, student in kept.items():
        unmerged_copy = copy.deepcopy(student)
        merged_models[variant], merges[variant] = merge_check(student, base, pairs)
        merged_models[variant + "_unmerged"] = unmerged_copy
    timing = latency({"student_base": base, **merged_models}, setup.latency_side, setup.latency_rounds)
    budget = {v: records[v][0]["trainable_params"] for v in setup.variants}
    return {
        "setup": dataclasses.asdict(setup),
        "threads": torch.get_num_threads(),
        "psnr_metric": f"Y channel (BT.601), {setup.scale}-pixel border shaved, SR rounded to 8 bits, mean over "
        f"{len(pairs)} held-out images",
        "eval_images": (f"right {data.HELD_OUT:.0%} of each of " + ", ".join(data.IMAGES))
        if setup.images == "skimage"
        else "synthetic",
        "fixed_psnr": {k: {"mean": statistics.mean(v), "per_image": v} for k, v in fixed.items()},
        "psnr": summarise(records),
        "records": records,
        "params": {
            "teacher": param_count(teacher),
            "student_base": param_count(base),
            "trainable": budget,
            "placement": {
                "reshape": dataclasses.asdict(dsclora_placement("reshape")),
                "kernel": dataclasses.asdict(kernel_placement(base)),
            },
        },
        "gradient_balance": balance,
        "merge": merges,
        "latency": timing,
        "seconds": time.perf_counter() - begin,
    }


def plot(results: dict, path: Path) -> None:
    """PSNR gain over the student base per variant (mean ± sd over seeds) and during tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = {k: v["mean"] for k, v in results["fixed_psnr"].items()}
    base = fixed["student_base"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(results["psnr"])
    gains = [results["psnr"][n]["mean"] - base for n in names]
    stds = [results["psnr"][n]["std"] for n in names]
    ax1.bar(
        range(len(names)),
        gains,
        yerr=stds,
        capsize=3,
        color=[
            "#999999" if n.startswith("full") else "#4477aa" if n.startswith("reshape") else "#ee6677"
            for n in names
        ],
    )
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax1.set_ylabel("PSNR-Y gain over the student base (dB)")
    setup = results["setup"]
    ax1.set_title(
        f"x{setup['scale']} SR: student {setup['student_channels']} ch (base {base:.2f} dB), teacher "
        f"{setup['teacher_channels']} ch (+{fixed['teacher'] - base:.2f} dB)",
        fontsize=10,
    )
    for name in names:
        curves = [r["curve"] for r in results["records"][name]]
        steps = [s for s, _ in curves[0]]
        ax2.plot(
            steps,
            [statistics.mean(c[i][1] for c in curves) - base for i in range(len(steps))],
            marker="o",
            label=name,
            ls="-" if "_kd" in name else "--",
        )
    ax2.set_xlabel("tuning step")
    ax2.set_ylabel("PSNR-Y gain (dB), mean over seeds")
    ax2.set_title(f"held-out images; {len(results['records'][names[0]])} seed(s)", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with few steps and one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="tuning seeds (default 0 1; --quick: 0)")
    parser.add_argument("--tune-steps", type=int)
    parser.add_argument("--student-channels", type=int, help="student width (default 24)")
    parser.add_argument("--images", choices=["skimage", "synthetic"])
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/dsclora[_quick].json)"
    )
    parser.add_argument("--plot", type=Path, help="PNG path (default docs/img/dsclora[_quick].png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--cache", type=Path, help="reuse pretrained teacher/base weights from this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = copy.deepcopy(QUICK if args.quick else Setup())
    if args.seeds:
        setup.seeds = tuple(args.seeds)
    if args.tune_steps is not None:
        setup.tune_steps = args.tune_steps
    if args.student_channels is not None:
        setup.student_channels = args.student_channels
    if args.images:
        setup.images = args.images
    suffix = "_quick" if args.quick else ""
    out = args.out or ROOT / f"benchmarks/results/dsclora{suffix}.json"
    results = run(setup, cache=args.cache)
    results["command"] = "python benchmarks/dsclora/run.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.no_plot:
        png = args.plot or ROOT / f"docs/img/dsclora{suffix}.png"
        plot(results, png)
        print(f"wrote {png}")
    return results


if __name__ == "__main__":
    main()
