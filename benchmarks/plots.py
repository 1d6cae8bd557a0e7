"""Draw docs/img/*.png from the measured results in benchmarks/results/*.json (no re-running).

    pip install matplotlib      # (benchmarks/requirements.txt)
    python benchmarks/plots.py  # writes docs/img/*.png, one per results file below

A plot is skipped (with a line saying so) when its results file is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS, OUT = ROOT / "benchmarks" / "results", ROOT / "docs" / "img"


def results(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        print(f"skip {name}: {path} is missing")
        return None
    return json.loads(path.read_text())


def finish(fig: plt.Figure, name: str) -> None:
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png", dpi=120)
    plt.close(fig)
    print(f"wrote docs/img/{name}.png")


def lora_cpu(d: dict) -> None:
    rows = [("p=0", "ours_p0", "peft_p0"), ("dropout 0.1", "ours_p0.1", "peft_p0.1")]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.18 for x in xs], [d["train"][o]["x_floor"] for _, o, _ in rows], 0.36, label="adapterlab")
    ax.bar([x + 0.18 for x in xs], [d["train"][p]["x_floor"] for _, _, p in rows], 0.36, label="peft")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [r[0] for r in rows])
    ax.set_ylabel("train step time / frozen-base floor")
    ax.set_title("LoRA r=16 training step, CPU (lower is better)")
    ax.legend()
    finish(fig, "lora_cpu")


def merge_cli(d: dict) -> None:
    s = d["settings"]["default"]
    mib = 2**20
    fig, (a, b) = plt.subplots(1, 2, figsize=(7, 3.2))
    names = ["adapterlab merge", "peft merge_and_unload"]
    a.bar(
        names,
        [s["ours"]["peak_above_baseline"] / mib, s["peft"]["peak_above_baseline"] / mib],
        color=["C0", "C1"],
    )
    a.axhline(d["largest_input_shard_bytes"] / mib, color="gray", ls="--", lw=0.8, label="largest shard")
    a.set_ylabel("peak RSS above baseline (MiB)")
    a.legend()
    b.bar(names, [s["ours"]["wall_s"], s["peft"]["wall_s"]], color=["C0", "C1"])
    b.set_ylabel("wall time (s)")
    fig.suptitle(
        f"Merging a LoRA into a {d['checkpoint_bytes'] / 1e9:.1f} GB bf16 checkpoint "
        f"({d['input_shards']} shards)"
    )
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    finish(fig, "merge_cli")


def sparse_memory(d: dict) -> None:
    rows = d["rows"]
    labels = {
        "full": "full FT",
        "dense_masked": "dense + mask",
        "sparse_1pct": "sparse 1%",
        "sparse_10pct": "sparse 10%",
        "lora_peft_r16": "peft LoRA r=16",
    }
    keys = [k for k in labels if k in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([labels[k] for k in keys], [rows[k]["persistent_bytes"] / 2**20 for k in keys])
    ax.set_yscale("log")
    ax.set_ylabel("training state: grads + AdamW + indices (MiB, log)")
    ax.set_title("Persistent training memory of the trained part")
    ax.tick_params(axis="x", labelsize=8)
    finish(fig, "sparse_memory")


def _retention_panels(
    d: dict, name: str, title: str, new_key, old_key, labels: dict[str, str], by_step: bool = False
) -> None:
    """Left: old-task retention against new-task accuracy (or the training step), one line per
    run (seed); right: step time."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, (variant, label) in enumerate(labels.items()):
        if variant not in d["records"][0]["runs"]:
            continue
        for j, rec in enumerate(d["records"]):
            curve = rec["runs"][variant]["curve"]
            steps = sorted(curve, key=int)
            pre = old_key(rec["pretrained"])
            xs = [int(st) for st in steps] if by_step else [new_key(curve[st]) for st in steps]
            ys = [old_key(curve[st]) / pre for st in steps]
            a.plot(xs, ys, color=f"C{i}", lw=1.2, alpha=0.8, label=label if j == 0 else None)
    a.set_xlabel("training steps on the new task" if by_step else "new-task accuracy")
    a.set_ylabel("old-task retention (vs pre-trained)")
    a.legend(fontsize=8)
    times = {v: ms for v, ms in d["step_ms"].items()}
    b.bar(list(times), list(times.values()), color=[f"C{list(labels).index(v)}" for v in times])
    b.set_ylabel("ms per step (median)")
    b.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    finish(fig, name)


def hft_forgetting(d: dict) -> None:
    labels = {
        "full": "full FT",
        "full_slow": "full FT, lr/2",
        "full_layers": "full FT, layers only",
        "dense_layers": "control: dense ΔW, layers",
        "hft": "HFT",
    }
    new = len(d["rules"]["old"])
    _retention_panels(
        d,
        "hft_forgetting",
        f"Llama toy pre-trained on {new} tasks, learning a new one ({len(d['records'])} seeds)",
        lambda acc: acc[new],
        lambda acc: sum(acc[:new]) / new,
        labels,
    )


def hft_minilm(d: dict) -> None:
    labels = {
        "full": "full FT",
        "full_slow": "full FT, lr/4",
        "full_layers": "full FT, layers only",
        "hft": "HFT",
    }
    _retention_panels(
        d,
        "hft_minilm",
        f"all-MiniLM-L6-v2 learning sentiment: topic knowledge kept ({len(d['records'])} seeds)",
        lambda acc: acc["sentiment"],
        lambda acc: acc["topic"],
        labels,
        by_step=True,
    )


def sara_digits(d: dict) -> None:
    s = d["summary"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.4))
    for how, style in (("smallest", "o-"), ("random", "s--"), ("largest", "^:")):
        fr = sorted(s["prune"][how], key=float)
        a.errorbar(
            [float(f) for f in fr],
            [s["prune"][how][f]["mean"] for f in fr],
            yerr=[
                [s["prune"][how][f]["mean"] - s["prune"][how][f]["min"] for f in fr],
                [s["prune"][how][f]["max"] - s["prune"][how][f]["mean"] for f in fr],
            ],
            fmt=style,
            label=f"zero the {how} |θ|" if how != "random" else "zero random entries",
        )
    a.set_xlabel("fraction of each weight zeroed")
    a.set_ylabel("pre-trained accuracy, digits 0-4")
    a.set_title("(a) small entries are ineffective", fontsize=9)
    a.legend(fontsize=7)
    variants = [v for v in ("full", "full_hi", "sara") if v in s["finetune"]]
    names = {"full": "full FT", "full_hi": "full FT, SaRA's lr", "sara": "SaRA 10%"}
    xs = range(len(variants))
    for off, key, label in ((-0.18, "new", "new classes 5-9"), (0.18, "old", "old classes 0-4")):
        vals = [s["finetune"][v][key] for v in variants]
        b.bar(
            [x + off for x in xs],
            [v["mean"] for v in vals],
            0.36,
            yerr=[[v["mean"] - v["min"] for v in vals], [v["max"] - v["mean"] for v in vals]],
            label=label,
        )
    b.set_xticks(list(xs), [names[v] for v in variants], fontsize=8)
    b.set_ylim(0.5, 1.0)
    b.set_ylabel("task-aware accuracy")
    b.set_title("(b) few-shot new classes", fontsize=9)
    b.legend(fontsize=7)
    rank = s["rank"]
    lam = [r["lambda_rel"] or rank[1]["lambda_rel"] / 3 for r in rank]  # λ̃ = 0 drawn left of the rest
    c.plot(lam, [r["erank"]["mean"] for r in rank], "o-", color="C0", label="effective rank of ΔW")
    c.set_xscale("log")
    c.set_xlabel("λ / L₀ (leftmost point: λ = 0)")
    c.set_ylabel("effective rank (256×256 ΔW)", color="C0")
    c2 = c.twinx()
    c2.plot(lam, [r["new"]["mean"] for r in rank], "s--", color="C1", label="new-class accuracy")
    c2.set_ylabel("new-class accuracy", color="C1")
    c2.set_ylim(0.75, 0.95)
    c.set_title("(c) nuclear-norm weight", fontsize=9)
    fig.suptitle(
        f"SaRA on a digits MLP ({len(d['seeds'])} seeds; bars and whiskers: mean, min-max)", fontsize=10
    )
    finish(fig, "sara_digits")


def spread(cell: dict) -> tuple[float, list[float]]:
    """A summary cell {"mean", "min", "max"} as (mean, [below, above]) for error bars."""
    return cell["mean"], [cell["mean"] - cell["min"], cell["max"] - cell["mean"]]


def locft_editing(d: dict) -> None:
    metrics = ("reliability", "generalization", "locality_same_subject", "locality_other_subjects")
    fig, axes = plt.subplots(1, 4, figsize=(12, 3), sharey=True)
    styles = {"breadth_first": ("o-", "breadth-first"), "depth_first": ("s--", "depth-first")}
    for ax, metric in zip(axes, metrics, strict=True):
        for n, color in zip(sorted({c["edits"] for c in d["summary"]}), ("C1", "C0"), strict=False):
            for strategy, (style, label) in styles.items():
                cells = sorted(
                    (c for c in d["summary"] if c["edits"] == n and c["strategy"] == strategy),
                    key=lambda c: c["layer"],
                )
                if not cells:
                    continue
                pts = [spread(c[metric]) for c in cells]
                ax.errorbar(
                    [c["layer"] for c in cells],
                    [p[0] for p in pts],
                    yerr=list(zip(*[p[1] for p in pts], strict=True)),
                    fmt=style,
                    color=color,
                    ms=4,
                    capsize=2,
                    label=f"{label}, {n} edits",
                )
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("edited layer (mlp.down_proj)")
    axes[0].set_ylabel(f"score (mean, min–max over {len(d['setup']['seeds'])} seeds)")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"LocFT edits in an {d['setup']['layers']}-layer LM pre-trained on {d['setup']['subjects']} subjects"
    )
    finish(fig, "locft_editing")


def dsclora_plateau(d: dict) -> None:
    base = d["fixed_psnr"]["plateau_base"]["mean"]
    names = list(d["psnr"])
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.1, 1.3, 1.3]})
    steps, psnr = zip(*d["pretrain_curve"], strict=True)
    a.plot(steps, psnr, "o-", ms=3)
    a.axhline(d["fixed_psnr"]["bicubic"]["mean"], color="gray", ls="--", lw=0.8, label="bicubic")
    a.set_xlabel("pre-training step")
    a.set_ylabel("held-out PSNR-Y (dB)")
    a.set_title(f"teacher = base: SPAN {d['setup']['channels']} ch ({base:.3f} dB)", fontsize=9)
    a.legend(fontsize=7)
    shown = [n for n in names if n != "dsclora_wrong_teacher"]
    for ax, keys, title in (
        (b, shown, "gain over the plateau base, per seed"),
        (c, names, "incl. the control (wrong affinity teacher)"),
    ):
        for i, n in enumerate(keys):
            vals = [v - base for v in d["psnr"][n]["per_seed"]]
            ax.scatter([i] * len(vals), vals, s=14, color="C0", zorder=3)
            ax.bar(i, sum(vals) / len(vals), color="#bbccee", width=0.6)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("PSNR-Y − plateau base (dB)")
        ax.set_title(f"{title}; {len(d['setup']['seeds'])} seeds", fontsize=9)
    finish(fig, "dsclora_plateau")


def sft_transfer(d: dict) -> None:
    rows = [
        ("B: langB + task", "langB + task"),
        ("B: task alone", "task alone"),
        ("B: langB + random-mask task", "langB +\nrandom mask"),
        ("B: random-mask task alone", "random mask\nalone"),
        ("B: full fine-tuning", "full FT\n(all dense)"),
        ("B: head on frozen base", "head on\nfrozen base"),
    ]
    summary = d["summary"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for x, (key, _) in enumerate(rows):
        row = summary[key]
        ax.bar(x, row["mean"], yerr=row["std"], color="C0" if x < 4 else "C7", capsize=3)
        ax.plot([x] * len(row["per_seed"]), row["per_seed"], "k.", ms=4)
    chance = summary["B: chance (majority class)"]["mean"]
    ax.axhline(chance, color="C3", ls="--", lw=0.8, label=f"majority class ({chance:.2f})")
    ax.set_xticks(range(len(rows)), [label for _, label in rows], fontsize=8)
    ax.set_ylim(0.2, 1.0)
    ax.set_ylabel("zero-shot accuracy on language B")
    ax.set_title(f"LT-SFT cross-lingual transfer ({len(d['setup']['seeds'])} seeds, mean ± std, dots: seeds)")
    ax.legend(loc="upper right", fontsize=8)
    finish(fig, "sft_transfer")


def levi_ood(d: dict) -> None:
    splits = (
        ("id", "ID"),
        ("ood", "OOD (both shifts)"),
        ("unseen_words", "unseen words"),
        ("flipped_day", "flipped token"),
    )
    methods = list(d["summary"])
    fig, ax = plt.subplots(figsize=(9, 3.2))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        pts = [spread(d["summary"][m][key]) for key, _ in splits]
        ax.bar(
            [i + (k - (len(methods) - 1) / 2) * width for i in range(len(splits))],
            [p[0] for p in pts],
            width,
            yerr=list(zip(*[p[1] for p in pts], strict=True)),
            capsize=2,
            label=m if len(d["runs"][m]) == len(d["seeds"]) else f"{m} ({len(d['runs'][m])} seed)",
        )
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(splits)), [label for _, label in splits])
    ax.set_ylabel(f"accuracy (mean, min–max over {len(d['seeds'])} seeds)")
    ax.set_title("LEVI vs full FT vs probe on a frozen all-MiniLM-L6-v2")
    ax.legend(fontsize=7, ncol=len(methods))
    finish(fig, "levi_ood")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (
        ("lora_cpu", lora_cpu),
        ("merge_cli", merge_cli),
        ("sparse_memory", sparse_memory),
        ("hft_forgetting", hft_forgetting),
        ("hft_minilm", hft_minilm),
        ("sara_digits", sara_digits),
        ("locft_editing", locft_editing),
        ("dsclora_plateau", dsclora_plateau),
        ("sft_transfer", sft_transfer),
        ("levi_ood", levi_ood),
    ):
        d = results(name)
        if d is not None:
            draw(d)


if __name__ == "__main__":
    main()
