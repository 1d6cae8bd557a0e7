"""LocFT: breadth-first vs depth-first editing of 100 facts in a small causal LM, per tuned layer.

Setup (CPU, fp32, 1 intra-op thread, no download):
- A word-level tokenizer built in memory; a fact table of 200 subjects with a city (30) and a job
  (20) each, written with 3 templates per relation ("s7 lives in" / "the home of s7 is" /
  "s7 resides in" → " c4"; "s7 works as" / "the job of s7 is" / "s7 is employed as" → " j2"), EOS.
- Pre-training: a Llama (hidden 128, FFN 256, 4 layers, 4 heads) learns all 1,200 sentences from
  scratch (causal LM loss, Adam 3e-3, batches of 64) until it completes every prompt correctly.
- Edits: 100 subjects get a new city. Edit prompt: template 1; paraphrases: templates 2 and 3;
  locality: the job prompt of every edited subject ("same subject") and the city prompt of one
  unedited subject per edit ("other subjects"), reported together and apart.
  Held-out perplexity: all 6 sentences of the 100 unedited subjects, before and after.
- For every layer 0–3, `al.locft.edit` on `mlp.down_proj`, breadth-first and depth-first, same
  lr and per-edit budget (`--lr`, `--epochs`; breadth-first batches of `--batch`). Then the
  official hyper-parameters (lr 5e-4, batches of 100, 25 epochs) at every layer, breadth-first,
  and breadth-first at the last layer with lower learning rates (1e-3, 3e-3) and 100 epochs.

    python benchmarks/locft_editing.py            # writes benchmarks/results/locft_editing.json
    python benchmarks/locft_editing.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

import adapterlab as al
from adapterlab.methods.locft import IGNORE, greedy, normalize

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS, CITIES, JOBS, EDITS = 200, 30, 20, 100
CITY = ["{} lives in", "the home of {} is", "{} resides in"]
JOB = ["{} works as", "the job of {} is", "{} is employed as"]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    words = [
        "[PAD]",
        "[EOS]",
        "[UNK]",
        "lives",
        "in",
        "the",
        "home",
        "of",
        "is",
        "resides",
        "works",
        "as",
        "job",
        "employed",
        *(f"s{i}" for i in range(SUBJECTS)),
        *(f"c{i}" for i in range(CITIES)),
        *(f"j{i}" for i in range(JOBS)),
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def facts(seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randrange(CITIES) for _ in range(SUBJECTS)], [rng.randrange(JOBS) for _ in range(SUBJECTS)]


def sentences(subjects: list[int], city: list[int], job: list[int]) -> list[tuple[str, str]]:
    return [(t.format(f"s{s}"), f"c{city[s]}") for s in subjects for t in CITY] + [
        (t.format(f"s{s}"), f"j{job[s]}") for s in subjects for t in JOB
    ]


def lm_batch(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    enc = tok([f"{p} {o}" for p, o in pairs], padding=True, return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.full((len(pairs), 1), tok.pad_token_id)], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.zeros(len(pairs), 1, dtype=torch.long)], dim=1)
    ends = mask.sum(1)
    ids[torch.arange(len(pairs)), ends] = tok.eos_token_id
    mask[torch.arange(len(pairs)), ends] = 1
    labels = ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def perplexity(model: nn.Module, tok, pairs: list[tuple[str, str]]) -> float:
    model.eval()
    batch = lm_batch(tok, pairs)
    tokens = (batch["labels"][:, 1:] != IGNORE).sum().item()
    return math.exp(lm_loss(model, batch).item() / tokens)


def pretrain(tok, corpus: list[tuple[str, str]], max_steps: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for step in range(1, max_steps + 1):
        model.train()
        batch = lm_batch(tok, rng.sample(corpus, 64))
        loss = lm_loss(model, batch) / (batch["labels"][:, 1:] != IGNORE).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            model.eval()
            outs = greedy(model, tok, [p for p, _ in corpus], 2)
            acc = sum(normalize(o) == o_ for o, (_, o_) in zip(outs, corpus, strict=True)) / len(corpus)
            print(f"pre-training step {step}: loss {loss.item():.4f}, prompts completed correctly {acc:.3f}")
            if acc == 1.0:
                break
    return model.eval()


def edit_requests(city: list[int], job: list[int], edited: list[int], kept: list[int]) -> list[dict]:
    rng = random.Random(1)
    reqs = []
    for k, s in enumerate(edited):
        new = (city[s] + rng.randrange(1, CITIES)) % CITIES
        reqs.append(
            {
                "prompt": CITY[0].format(f"s{s}"),
                "target": f"c{new}",
                "paraphrases": [t.format(f"s{s}") for t in CITY[1:]],
                "locality": [JOB[0].format(f"s{s}"), CITY[0].format(f"s{kept[k]}")],
            }
        )
    return reqs


def run(
    pretrained: nn.Module,
    tok,
    reqs: list[dict],
    held_out: list[tuple[str, str]],
    layer: int,
    strategy: str,
    lr: float,
    batch: int,
    epochs: int,
) -> dict:
    model = copy.deepcopy(pretrained)
    report = al.locft.edit(
        model, tok, reqs, layer=layer, strategy=strategy, lr=lr, batch_size=batch, epochs=epochs
    )
    scores = al.locft.evaluate(model, tok, reqs)
    same, other = (
        al.locft.evaluate(
            model, tok, [{**r, "paraphrases": [], "locality": [r["locality"][k]]} for r in reqs]
        )["locality"]
        for k in (0, 1)
    )
    return {
        "layer": layer,
        "strategy": strategy,
        "lr": lr,
        "batch": batch,
        "epochs_max": epochs,
        "reliability": scores["reliability"],
        "generalization": scores["generalization"],
        "locality": scores["locality"],
        "locality_same_subject": same,
        "locality_other_subjects": other,
        "ppl_after": perplexity(model, tok, held_out),
        "steps": report.steps,
        "skipped": report.skipped,
        "epochs_run": report.epochs,
        "final_loss": report.final_loss,
        "seconds": report.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    tok = tokenizer()
    city, job = facts()
    corpus = sentences(list(range(SUBJECTS)), city, job)
    pretrained = pretrain(tok, corpus, 500 if args.quick else 4000)
    order = random.Random(2).sample(range(SUBJECTS), SUBJECTS)
    edited, kept = order[:EDITS], order[EDITS:]
    reqs = edit_requests(city, job, edited, kept)
    held_out = sentences(kept, city, job)
    ppl_before = perplexity(pretrained, tok, held_out)
    before = al.locft.evaluate(pretrained, tok, reqs)
    print(f"before editing: {before}, held-out ppl {ppl_before:.3f}")
    layers = [3] if args.quick else [0, 1, 2, 3]
    rows = []
    for layer in layers:
        for strategy in ("breadth_first", "depth_first"):
            rows.append(
                run(pretrained, tok, reqs, held_out, layer, strategy, args.lr, args.batch, args.epochs)
            )
            print(rows[-1])
    for layer in layers:
        rows.append(run(pretrained, tok, reqs, held_out, layer, "breadth_first", 5e-4, 100, 25))
        print(rows[-1])
    for lr in (1e-3, 3e-3):
        rows.append(run(pretrained, tok, reqs, held_out, layers[-1], "breadth_first", lr, args.batch, 100))
        print(rows[-1])
    print(f"\nheld-out perplexity before editing: {ppl_before:.3f}\n")
    print(
        "| layer | strategy | lr | batch | max epochs | reliability | generalization | locality (same subject / "
        "others) | held-out ppl | steps | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        batch = r["batch"] if r["strategy"] == "breadth_first" else 1
        print(
            f"| {r['layer']} | {r['strategy']} | {r['lr']:g} | {batch} | {r['epochs_max']} "
            f"| {r['reliability']:.2f} | {r['generalization']:.2f} | {r['locality']:.2f} "
            f"({r['locality_same_subject']:.2f} / {r['locality_other_subjects']:.2f}) | {r['ppl_after']:.2f} "
            f"| {r['steps']} | {r['seconds']:.1f} |"
        )
    if not args.quick:
        out = ROOT / "benchmarks/results/locft_editing.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "before": before,
                    "ppl_before": ppl_before,
                    "rows": rows,
                    "args": vars(args),
                    "threads": 1,
                    "seconds": time.time() - start,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {out}")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
