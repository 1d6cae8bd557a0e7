"""Text classification with all-MiniLM-L6-v2: LoRA or SaRA under `transformers.Trainer`, then export.

    python examples/text_classification.py --method lora     # PEFT export, checked with peft
    python examples/text_classification.py --method sara     # dense export, checked with al.load
    python examples/text_classification.py --tiny            # seconds: a random tiny BERT (CI)

The task is generated (see `_common.topic_task`): a sentence mentions one word of a topic (sports,
food, technology, weather). Test sentences use other templates and other topic words than training
("cricket" is never seen in training), so accuracy measures what the pretrained model knows, not
memorised sentences.

The classification head is new (random, seeded: `_common.base_model`). It is trained as part of
the one adapter by targeting it: LoRA's ΔW = B·A on the 4×384 head has rank ≤ 4, so with r = 8 the
head update is unrestricted, and the whole result is one adapter directory that PEFT loads as is.
SaRA trains the smallest 10% of every linear weight's entries, the head's included.
(The alternatives: a separate `dense` adapter on the head — a second directory, and no PEFT form;
or leaving the head out of the adapter and setting `requires_grad` — then `al.save` does not save it.)

Prints accuracy before / after, the sizes of the adapter and of the Trainer checkpoint, and the
largest logit difference between the exported adapter (loaded by peft, or added to the base
weights as dense ΔW) and the trained model; the last line is all of it as JSON.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C
import torch

import adapterlab as al

OUT = Path(tempfile.gettempdir()) / "adapterlab-examples" / "text_classification"
METHODS = {
    "lora": dict(method="lora", r=8, alpha=16, targets=["query", "value", "classifier"]),
    "sara": dict(
        method="sara", density=0.1, targets="all-linear"
    ),  # + progressive_step, set from the run length
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=list(METHODS), default="lora")
    parser.add_argument("--tiny", action="store_true", help="a random tiny BERT and a small data sample (CI)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="where everything is written (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-3 (LoRA), 2e-3 (SaRA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy shared machine)"
    )
    return parser.parse_args()


def inject(model: torch.nn.Module, method: str, steps: int) -> None:
    """LoRA, or SaRA with its progressive re-selection half-way (AdapterCallback runs it)."""
    options = dict(METHODS[method])
    if method == "sara":
        options["progressive_step"] = steps // 2
    al.inject(model, options.pop("method"), **options)


def check_peft_export(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    adapter: Path,
    out: Path,
    tiny: bool,
    num_labels: int,
    seed: int,
) -> float:
    """`adapterlab export --format peft`, loaded into a fresh base by peft: the largest logit difference."""
    from peft import PeftModel

    C.adapterlab("export", adapter, "--format", "peft", "--out", out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers method deprecated in v5
        loaded = PeftModel.from_pretrained(C.base_model(num_labels, tiny, seed), str(out))
    return (C.logits(loaded, tokenizer, texts) - C.logits(model, tokenizer, texts)).abs().max().item()


def check_dense_export(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    adapter: Path,
    out: Path,
    tiny: bool,
    num_labels: int,
    seed: int,
) -> float:
    """`adapterlab export --format dense` (one safetensors file, `<module>.weight` = ΔW), added to
    the weights of a fresh base: the largest logit difference."""
    from safetensors.torch import load_file

    C.adapterlab("export", adapter, "--format", "dense", "--out", out)
    merged = C.base_model(num_labels, tiny, seed)
    with torch.no_grad():
        for key, delta in load_file(out).items():
            merged.get_submodule(key.removesuffix(".weight")).weight += delta
    return (C.logits(merged, tokenizer, texts) - C.logits(model, tokenizer, texts)).abs().max().item()


def main() -> None:
    args = arguments()
    start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    task = C.topic_task(args.seed)
    if args.tiny:
        task = C.shrink(task, 48, 32)
        args.epochs = 1
    lr = args.lr or {"lora": 5e-3, "sara": 2e-3}[args.method]
    tokenizer = C.tokenizer_for(args.tiny)
    model = C.base_model(len(task.labels), args.tiny, args.seed)
    print(
        f"task {task.name}: labels {task.labels}, {len(task.train)} train / {len(task.test)} test sentences"
    )
    before = C.accuracy(model, tokenizer, task.test)

    batch_size = 16
    steps = math.ceil(len(task.train) / batch_size) * math.ceil(args.epochs)
    inject(model, args.method, steps)
    summary = al.trainable_summary(model)
    print(f"{args.method}: {summary}")
    trainer = C.train(
        model,
        tokenizer,
        C.to_dataset(task.train, tokenizer),
        args.out / "trainer",
        epochs=args.epochs,
        lr=lr,
        batch_size=batch_size,
        seed=args.seed,
    )
    checkpoint = args.out / "trainer" / f"checkpoint-{trainer.state.global_step}"
    after = C.accuracy(model, tokenizer, task.test)
    train_accuracy = C.accuracy(model, tokenizer, task.train)
    print(f"test accuracy: before {before:.3f}, after {after:.3f} (train {train_accuracy:.3f})")

    adapter = al.save(model, args.out / "adapter")
    texts = [t for t, _ in task.test]
    with al.disabled(model):
        base_logits = C.logits(model, tokenizer, texts)
    result = {
        "example": "text_classification",
        "method": args.method,
        "tiny": args.tiny,
        "accuracy_before": before,
        "accuracy_after": after,
        "train_accuracy": train_accuracy,
        "steps": trainer.state.global_step,
        "lr": lr,
        "trainable": summary.trainable,
        "adapter_bytes": C.dir_bytes(adapter),
        "checkpoint_bytes": C.dir_bytes(checkpoint),
        "adapter_dir": str(adapter),
        # how far training moved the logits: the export differences below are small against this
        "adapter_max_logit_change": (C.logits(model, tokenizer, texts) - base_logits).abs().max().item(),
    }
    if args.method == "lora":
        result["peft_dir"] = str(args.out / "peft")
        result["peft_max_abs_diff"] = check_peft_export(
            model, tokenizer, texts, adapter, args.out / "peft", args.tiny, len(task.labels), args.seed
        )
    else:
        result["frozen_by_reselection"] = sum(
            int(layer.deltas["default"].frozen.sum()) for _, layer in al.model.adapter_layers(model)
        )
        result["dense_file"] = str(args.out / "dense.safetensors")
        result["dense_max_abs_diff"] = check_dense_export(
            model,
            tokenizer,
            texts,
            adapter,
            Path(result["dense_file"]),
            args.tiny,
            len(task.labels),
            args.seed,
        )
    result["seconds"] = round(time.time() - start, 1)
    C.report(result)


if __name__ == "__main__":
    main()
