"""LocFT-BF: breadth-first vs depth-first editing of 10 and 50 facts in an 8-layer causal LM
pre-trained on 2,000 subjects, per edited layer, over 3 seeds.

Setup (CPU, fp32, 1 intra-op thread, no download):
- A word-level tokenizer built in memory; a fact table of 2,000 subjects with a city (of 50) and a
  job (of 30) each: "s7 lives in" / "the home of s7 is" / "s7 resides in" → " c4"; "s7 works as"
  → " j2"; then EOS.
- Pre-training (once, seed 0, cached in the temp directory): a Llama (hidden 64, FFN 128, 8 layers,
  4 heads) learns all 8,000 sentences (3 city templates, 1 job template per subject) from scratch:
  cross-entropy on the object and EOS, Adam (one-cycle, peak 1e-2), 400 steps of 500.
- Edits (per seed: which subjects, which new city), among the subjects whose 4 prompts the
  pre-trained model completes correctly: N ∈ {10, 50} subjects get a new city. Edit prompt:
  template 1; paraphrases: templates 2 and 3; locality: the job prompt of every edited subject
  ("same subject") and the city prompt of one unedited subject per edit ("other subjects").
  Held-out perplexity: of the objects of 300 unedited subjects' 4 sentences.
- `al.locft.edit` on `mlp.down_proj`, lr 1e-2, 25 steps per edit: breadth-first (25 epochs in
  batches of 1, so the same steps as depth-first and only the order differs) at every layer for
  N=10; breadth-first and depth-first (each edit for up to 25 steps) at layers 1 and 7 for both N.
  Loss: per example, then over the batch (the official code).
- Controls: (a) with the edit disabled (`al.disabled`), the old facts of the edited subjects must
  come back exactly (the edit lives only in its delta); (b) before editing, reliability of the new
  targets is 0 and the old facts are all known (the task is a real change); (c) depth-first's
  retention by position: the first half of its edits against the second half.

    python benchmarks/locft_editing.py           # writes benchmarks/results/locft_editing.json
    python benchmarks/locft_editing.py --tiny    # seconds: a smoke run (tests/test_editing_ood_benchmarks.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

import adapterlab as al
from adapterlab.methods.locft import IGNORE, greedy, normalize

ROOT = Path(__file__).resolve().parents[1]
CITY = ["{} lives in", "the home of {} is", "{} resides in"]
JOB = ["{} works as"]  # one template: the job prompt is only read for locality


@dataclass
class Setup:
    """Sizes of one benchmark run (the full run, or `--tiny`)."""

    subjects: int = 2000
    cities: int = 50
    jobs: int = 30
    layers: int = 8
    hidden: int = 64
    ffn: int = 128
    pretrain_lr: float = 1e-2
    pretrain_steps: int = 400
    pretrain_batch: int = 500
    seeds: tuple[int, ...] = (0, 1, 2)
    edits: tuple[int, ...] = (10, 50)
    sweep_edits: int = 10  # the layer sweep (breadth-first at every layer) uses this many edits
    compare_layers: tuple[int, ...] = (1, 7)  # depth-first, and the other edit counts, at these layers
    held_out: int = 300
    lr: float = 1e-2
    batch: int = 1  # breadth-first in batches of 1: the same steps as depth-first, only the order differs
    epochs: int = 25


TINY = Setup(
    subjects=40,
    cities=6,
    jobs=4,
    layers=2,
    hidden=32,
    ffn=64,
    pretrain_steps=40,
    pretrain_batch=32,
    seeds=(0,),
    edits=(4,),
    sweep_edits=4,
    compare_layers=(0, 1),
    held_out=10,
    epochs=3,
)


def tokenizer(s: Setup) -> transformers.PreTrainedTokenizerFast:
    words = ["[PAD]", "[EOS]", "[UNK]", "lives", "in", "the", "home", "of", "is", "resides", "works", "as"]
    words += ["job", "employed", *(f"s{i}" for i in range(s.subjects)), *(f"c{i}" for i in range(s.cities))]
    words += [f"j{i}" for i in range(s.jobs)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


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
    labels = torch.full_like(ids, IGNORE)  # the object and EOS only: the rest is template or random
    rows = torch.arange(len(pairs))
    labels[rows, ends - 1], labels[rows, ends] = ids[rows, ends - 1], ids[rows, ends]
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
    return math.exp(lm_loss(model, batch).item() / (batch["labels"][:, 1:] != IGNORE).sum().item())


def known(model: nn.Module, tok, pairs: list[tuple[str, str]]) -> float:
    """The fraction of prompts the model completes with their object (greedy, exact match)."""
    outs = greedy(model, tok, [p for p, _ in pairs], 2)
    return sum(normalize(o) == o_ for o, (_, o_) in zip(outs, pairs, strict=True)) / len(pairs)


def cache_path(s: Setup) -> Path:
    """Where the pre-trained model of this setup is kept between runs (pre-training is the slow part)."""
    key = f"v2-{s.subjects}-{s.cities}-{s.jobs}-{s.layers}-{s.hidden}-{s.ffn}-{s.pretrain_lr}"
    key += f"-{s.pretrain_steps}-{s.pretrain_batch}"
    return Path(tempfile.gettempdir()) / "adapterlab-bench" / f"locft_pretrained_{key}.pt"


def pretrain(s: Setup, tok, corpus: list[tuple[str, str]], cache: bool) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(cfg)
    path = cache_path(s)
    if cache and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"pre-trained model from {path}")
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=s.pretrain_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, s.pretrain_lr, total_steps=s.pretrain_steps, pct_start=0.1
    )
    rng = random.Random(0)
    for step in range(1, s.pretrain_steps + 1):
        model.train()
        batch = lm_batch(tok, rng.sample(corpus, min(s.pretrain_batch, len(corpus))))
        loss = lm_loss(model, batch) / (batch["labels"][:, 1:] != IGNORE).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            acc = known(model.eval(), tok, rng.sample(corpus, 1000))
            print(f"pre-training step {step}: loss {loss.item():.4f}, 1,000 prompts completed {acc:.3f}")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def edit_requests(s: Setup, city: list[int], job: list[int], edited: list[int], others: list[int], seed: int):
    rng = random.Random(1000 + seed)
    reqs = []
    for k, subj in enumerate(edited):
        new = (city[subj] + rng.randrange(1, s.cities)) % s.cities
        reqs.append(
            {
                "prompt": CITY[0].format(f"s{subj}"),
                "target": f"c{new}",
                "paraphrases": [t.format(f"s{subj}") for t in CITY[1:]],
                "locality": [JOB[0].format(f"s{subj}"), CITY[0].format(f"s{others[k]}")],
            }
        )
    return reqs


def score(model: nn.Module, tok, reqs: list[dict]) -> dict[str, float]:
    out = al.locft.evaluate(model, tok, reqs)
    same, other = (
        al.locft.evaluate(
            model, tok, [{**r, "paraphrases": [], "locality": [r["locality"][k]]} for r in reqs]
        )["locality"]
        for k in (0, 1)
    )
    return {
        "reliability": out["reliability"],
        "generalization": out["generalization"],
        "locality": out["locality"],
        "locality_same_subject": same,
        "locality_other_subjects": other,
    }


def run(s: Setup, pretrained, tok, reqs, old, held, layer: int, strategy: str, seed: int) -> dict:
    model = copy.deepcopy(pretrained)
    report = al.locft.edit(
        model,
        tok,
        reqs,
        layer=layer,
        strategy=strategy,
        lr=s.lr,
        batch_size=s.batch,
        epochs=s.epochs,
        seed=seed,
    )
    row = {"edits": len(reqs), "layer": layer, "strategy": strategy, "seed": seed, **score(model, tok, reqs)}
    half = len(reqs) // 2
    row["reliability_first_half"] = al.locft.evaluate(model, tok, reqs[:half])["reliability"]
    row["reliability_second_half"] = al.locft.evaluate(model, tok, reqs[half:])["reliability"]
    row["ppl_held_out"] = perplexity(model, tok, held)
    with al.disabled(model):  # control (a): the old facts come back with the edit switched off
        row["control_old_facts_with_edit_disabled"] = known(model, tok, old)
    row.update(steps=report.steps, skipped=report.skipped, epochs_run=report.epochs, seconds=report.seconds)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    metrics = [
        "reliability",
        "generalization",
        "locality",
        "locality_same_subject",
        "locality_other_subjects",
    ]
    metrics += ["reliability_first_half", "reliability_second_half", "ppl_held_out", "steps"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["edits"], r["layer"], r["strategy"]), []).append(r)
    out = []
    for (edits, layer, strategy), rs in sorted(groups.items()):
        cell = {"edits": edits, "layer": layer, "strategy": strategy, "seeds": len(rs)}
        for m in metrics:
            vals = [r[m] for r in rs]
            cell[m] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals)}
        out.append(cell)
    return out


def table(summary: list[dict]) -> str:
    """The summary as a markdown table: mean (min–max) over the seeds."""

    def cell(c: dict, fmt: str = ".2f") -> str:
        return f"{c['mean']:{fmt}} ({c['min']:{fmt}}–{c['max']:{fmt}})"

    lines = [
        "| edits | layer | strategy | reliability | generalization | locality, same subject | "
        "locality, other subjects | held-out ppl | first / second half reliability |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in summary:
        lines.append(
            f"| {c['edits']} | {c['layer']} | {c['strategy'].replace('_', '-')} | {cell(c['reliability'])} "
            f"| {cell(c['generalization'])} | {cell(c['locality_same_subject'])} "
            f"| {cell(c['locality_other_subjects'])} | {cell(c['ppl_held_out'])} "
            f"| {c['reliability_first_half']['mean']:.2f} / {c['reliability_second_half']['mean']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = TINY if args.tiny else Setup()
    start = time.time()
    tok = tokenizer(s)
    frng = random.Random(0)
    city = [frng.randrange(s.cities) for _ in range(s.subjects)]
    job = [frng.randrange(s.jobs) for _ in range(s.subjects)]
    corpus = sentences(list(range(s.subjects)), city, job)
    t0, c0 = time.time(), time.process_time()
    pretrained = pretrain(s, tok, corpus, cache=not args.tiny)
    pre_seconds = {"wall": time.time() - t0, "cpu": time.process_time() - c0}
    outs = greedy(pretrained, tok, [p for p, _ in corpus], 2)
    right = [normalize(o) == t for o, (_, t) in zip(outs, corpus, strict=True)]
    pre_known = sum(right) / len(right)
    # edit (and test locality on) only subjects whose 4 prompts the model completes correctly
    n_city = len(CITY) * s.subjects
    fully_known = [
        x
        for x in range(s.subjects)
        if all(right[x * len(CITY) + k] for k in range(len(CITY))) and right[n_city + x]
    ]
    print(f"pre-trained: {pre_known:.4f} of {len(corpus)} prompts, {len(fully_known)} subjects fully known")
    if len(fully_known) < max(s.edits) + s.held_out:
        raise SystemExit(
            f"only {len(fully_known)} subjects fully known: too few for the edits and held-out set"
        )
    rows, controls = [], []
    for seed in s.seeds:
        order = random.Random(seed).sample(fully_known, len(fully_known))
        held_subjects = order[-s.held_out :]
        held = sentences(held_subjects, city, job)
        for n in s.edits:
            edited, others = order[:n], held_subjects[:n]
            reqs = edit_requests(s, city, job, edited, others, seed)
            old = [(CITY[0].format(f"s{x}"), f"c{city[x]}") for x in edited]
            before = score(pretrained, tok, reqs)
            controls.append(
                {"seed": seed, "edits": n, **before, "old_facts_known": known(pretrained, tok, old)}
            )
            cells = [(layer, "breadth_first") for layer in range(s.layers) if n == s.sweep_edits]
            cells += [
                (layer, strategy)
                for layer in s.compare_layers
                for strategy in ("breadth_first", "depth_first")
            ]
            for layer, strategy in dict.fromkeys(cells):
                rows.append(run(s, pretrained, tok, reqs, old, held, layer, strategy, seed))
                r = rows[-1]
                print(
                    f"seed {seed} N={n} layer {layer} {strategy:13s}: rel {r['reliability']:.2f} "
                    f"gen {r['generalization']:.2f} loc {r['locality_same_subject']:.2f}/"
                    f"{r['locality_other_subjects']:.2f} ppl {r['ppl_held_out']:.2f} "
                    f"ctrl {r['control_old_facts_with_edit_disabled']:.2f} {r['seconds']:.1f}s"
                )
    result = {
        "setup": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "pretrained_known": pre_known,
        "fully_known_subjects": len(fully_known),
        "ppl_held_out_before": {
            seed: perplexity(
                pretrained,
                tok,
                sentences(
                    random.Random(seed).sample(fully_known, len(fully_known))[-s.held_out :], city, job
                ),
            )
            for seed in s.seeds
        },
        "controls_before_editing": controls,
        "rows": rows,
        "summary": summarize(rows),
        "threads": 1,
        "pretrain_seconds": pre_seconds,
        "seconds": time.time() - start,
        "cpu_seconds": time.process_time(),
    }
    print(table(result["summary"]))
    out = args.out or (None if args.tiny else ROOT / "benchmarks/results/locft_editing.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    print(f"total {time.time() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
