"""Two task adapters on one base, combined with TIES by `adapterlab combine CONFIG.yaml`.

    python examples/combine_ties.py           # all-MiniLM-L6-v2, two generated tasks
    python examples/combine_ties.py --tiny    # seconds: a random tiny BERT (CI)

Task A is sentiment (positive / negative opinions), task B is topic (sports, food, technology,
weather); both are generated, with other templates and words in the test sets (see `_common`).
The two tasks share one 6-way head: A owns outputs 0–1, B owns outputs 2–5. Each LoRA (query,
value and the head) trains with the cross-entropy over its own outputs only, so the head rows of
the other task get no gradient and stay exactly unchanged: the two adapters' head updates are
disjoint, and a task is scored by the argmax over its own outputs.

Then: a YAML file naming both adapter directories, `adapterlab combine` with `how: ties` (trim each
task vector to its largest `density` entries, elect a sign per entry, average the agreeing ones),
the result loaded with `al.load`, and each task's test accuracy for adapter A, adapter B, the
stack A+B (both active: plain task arithmetic) and the TIES combination. The combination is
written as `kind: dense` (a full ΔW per module): a TIES result is not low-rank, and the 6×384 head
cannot take a rank-8 re-factoring anyway (`kind: lora` needs rank ≤ 6 there).
The last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import torch
import yaml

import adapterlab as al

OUT = Path(tempfile.gettempdir()) / "adapterlab-examples" / "combine_ties"
LORA = dict(r=8, alpha=16, targets=["query", "value", "classifier"])


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random tiny BERT and a small data sample (CI)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="where everything is written (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy shared machine)"
    )
    return parser.parse_args()


def label_ids(tasks: dict[str, C.Task]) -> dict[str, list[int]]:
    """Each task's outputs in the shared head, in order: {"sentiment": [0, 1], "topic": [2, 3, 4, 5]}."""
    ids, start = {}, 0
    for name, task in tasks.items():
        ids[name] = list(range(start, start + len(task.labels)))
        start += len(task.labels)
    return ids


def train_task(
    name: str, tasks: dict[str, C.Task], ids: dict[str, list[int]], tokenizer: Any, args: argparse.Namespace
) -> Path:
    """A LoRA for task `name` on a fresh base, trained on its own head outputs; saved to out/<name>."""
    model = C.base_model(sum(len(ids[t]) for t in tasks), args.tiny, args.seed)
    al.inject(model, "lora", **LORA)
    data = C.to_dataset(tasks[name].train, tokenizer, label_offset=ids[name][0])
    C.train(
        model,
        tokenizer,
        data,
        args.out / "trainer" / name,
        epochs=args.epochs,
        lr=args.lr,
        label_ids=ids[name],
        seed=args.seed,
    )
    others = [i for i in range(model.num_labels) if i not in ids[name]]
    if model.classifier.deltas["default"].delta_weight()[others].any():
        sys.exit(f"{name}: the head rows of the other task changed; they should get no gradient")
    return al.save(model, args.out / name)


def scores(
    model: torch.nn.Module, tasks: dict[str, C.Task], ids: dict[str, list[int]], tokenizer: Any
) -> dict[str, float]:
    """Test accuracy per task, each by the argmax over its own outputs."""
    return {name: C.accuracy(model, tokenizer, task.test, ids[name]) for name, task in tasks.items()}


def write_config(out: Path, dirs: dict[str, Path], density: float) -> Path:
    """The `adapterlab combine` YAML file (paths relative to it)."""
    config = {
        "adapters": {name: d.name for name, d in dirs.items()},
        "weights": {name: 1.0 for name in dirs},
        "how": "ties",
        "kind": "dense",
        "density": density,
        "trim_scope": "tensor",
        "out": "ties",
    }
    path = out / "ties.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"--- {path}\n{path.read_text()}---")
    return path


def main() -> None:
    args = arguments()
    start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tasks = {"sentiment": C.sentiment_task(args.seed), "topic": C.topic_task(args.seed)}
    if args.tiny:
        tasks = {name: C.shrink(task, 32, 24) for name, task in tasks.items()}
        args.epochs = 1
    ids = label_ids(tasks)
    tokenizer = C.tokenizer_for(args.tiny)
    args.out.mkdir(parents=True, exist_ok=True)
    num_labels = sum(len(v) for v in ids.values())

    dirs = {name: train_task(name, tasks, ids, tokenizer, args) for name in tasks}
    model = C.base_model(num_labels, args.tiny, args.seed)
    table = {"base": scores(model, tasks, ids, tokenizer)}
    for name, d in dirs.items():
        al.load(model, d, name=name)
    for name in dirs:
        al.set_active(model, name)
        table[name] = scores(model, tasks, ids, tokenizer)
    al.set_active(model, list(dirs))
    table["stacked"] = scores(model, tasks, ids, tokenizer)

    C.adapterlab("combine", write_config(args.out, dirs, args.density))
    combined = al.load(C.base_model(num_labels, args.tiny, args.seed), args.out / "ties", name="ties")
    table["ties"] = scores(combined, tasks, ids, tokenizer)

    print(f"\n| adapter | {' | '.join(tasks)} |\n| --- |{' --- |' * len(tasks)}")
    for row, accs in table.items():
        print(f"| {row} | {' | '.join(f'{accs[t]:.3f}' for t in tasks)} |")
    C.report(
        {
            "example": "combine_ties",
            "tiny": args.tiny,
            "accuracy": table,
            "density": args.density,
            "combined_dir": str(args.out / "ties"),
            "seconds": round(time.time() - start, 1),
        }
    )


if __name__ == "__main__":
    main()
