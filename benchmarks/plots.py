"""Draw docs/img/*.png from the measured results in benchmarks/results/*.json (no re-running).

    pip install matplotlib      # (benchmarks/requirements.txt)
    python benchmarks/plots.py  # writes docs/img/{lora_cpu,merge_cli,sparse_memory,hft_forgetting,locft_editing,levi_ood}.png

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


def hft_forgetting(d: dict) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2), sharex=True)
    for name, label in (("full", "full FT"), ("full_layers", "full FT, layers only"), ("hft", "HFT")):
        curve = d["summary"][name]["curve"]
        steps = sorted(curve, key=int)
        a.plot([int(s) for s in steps], [curve[s]["acc_A"] for s in steps], label=label)
        b.plot([int(s) for s in steps], [curve[s]["acc_B"] for s in steps], label=label)
    a.set_title("task A (learned before)")
    b.set_title("task B (being learned)")
    for ax in (a, b):
        ax.set_xlabel("training steps on task B")
        ax.set_ylabel("accuracy")
    a.legend()
    finish(fig, "hft_forgetting")


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
        ("locft_editing", locft_editing),
        ("levi_ood", levi_ood),
    ):
        d = results(name)
        if d is not None:
            draw(d)


if __name__ == "__main__":
    main()
