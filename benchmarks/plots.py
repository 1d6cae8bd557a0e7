"""Draw docs/img/*.png from the measured results in benchmarks/results/*.json (no re-running).

    pip install matplotlib      # (benchmarks/requirements.txt)
    python benchmarks/plots.py  # writes docs/img/{lora_cpu,merge_cli,sparse_memory,hft_forgetting,locft_editing}.png

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


def locft_editing(d: dict) -> None:
    rows = [r for r in d["rows"] if r["lr"] == d["args"]["lr"] and r["batch"] == d["args"]["batch"]]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3), sharey=True)
    for ax, metric in zip(axes, ("reliability", "generalization", "locality"), strict=True):
        for strategy, style in (("breadth_first", "o-"), ("depth_first", "s--")):
            pts = sorted((r["layer"], r[metric]) for r in rows if r["strategy"] == strategy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=strategy.replace("_", "-"))
        ax.set_title(metric)
        ax.set_xlabel("edited layer (mlp.down_proj)")
    axes[0].set_ylabel("score (100 edits)")
    axes[0].legend()
    finish(fig, "locft_editing")


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


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (
        ("lora_cpu", lora_cpu),
        ("merge_cli", merge_cli),
        ("sparse_memory", sparse_memory),
        ("hft_forgetting", hft_forgetting),
        ("locft_editing", locft_editing),
        ("sft_transfer", sft_transfer),
    ):
        d = results(name)
        if d is not None:
            draw(d)


if __name__ == "__main__":
    main()
