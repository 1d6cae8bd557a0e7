"""LEVI vs full fine-tuning vs a linear probe on a task with a spurious feature that flips OOD.

Setup (CPU, fp32, 1 intra-op thread, no download):
- Tokens: [PAD] [CLS] [MASK], two markers M0/M1, 10 positive, 10 negative and 40 neutral words.
  A sequence: [CLS], a marker, 14 words of which 3–5 carry sentiment with a clear majority.
- Core feature: the label follows the sentiment majority with probability `core` (else it is
  flipped). Spurious feature: the marker equals M_label with probability ρ — ρ = 0.95 in training
  and in the in-distribution (ID) test, ρ = 0.05 in the out-of-distribution (OOD) test (flipped).
  Two regimes: core = 1.0 (the core feature decides the label) and core = 0.85 (the marker is the
  more reliable feature in training; a classifier using only the core feature scores 0.85 on both
  tests, one using only the marker 0.95 ID and 0.05 OOD).
- Pre-training: a BERT (hidden 64, 4 layers, 4 heads, FFN 128) learns masked-token prediction
  from scratch (2,000 steps) on 20,000 unlabeled sequences whose markers are random.
- Fine-tuning on 4,000 labeled training sequences (batches of 64, Adam), 3 seeds each:
  `full`   BertForSequenceClassification from the pre-trained encoder, every parameter trains
           (lr 3e-4, 400 steps);
  `probe`  frozen encoder, a linear classifier on the masked mean of the last layer (lr 1e-2,
           400 steps);
  `levi`   al.levi.LEVI(encoder): heads on all 4 layers fed [h_l; g(x)], g trained from scratch
           (lr 1e-3, 400 steps).
  Accuracy on 2,000 ID and 2,000 OOD test sequences.

    python benchmarks/levi_ood.py            # writes benchmarks/results/levi_ood.json
    python benchmarks/levi_ood.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional as F

import adapterlab as al

ROOT = Path(__file__).resolve().parents[1]
PAD, CLS, MASK, M0, M1 = 0, 1, 2, 3, 4
POS = list(range(5, 15))
NEG = list(range(15, 25))
NEUTRAL = list(range(25, 65))
VOCAB, LENGTH, WORDS = 65, 16, 14


def make_data(
    n: int, rho: float | None, gen: torch.Generator, core: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences and labels; rho=None gives random markers (pre-training)."""
    sentiment = torch.randint(0, 2, (n,), generator=gen)  # 1: positive words are the majority
    n_sent = torch.randint(3, 6, (n,), generator=gen)
    low = n_sent // 2 + 1
    n_major = low + (torch.rand(n, generator=gen) * (n_sent + 1 - low)).long()
    slot = torch.arange(WORDS).expand(n, WORDS)
    pos, neg, neutral = (
        torch.tensor(pool)[torch.randint(0, len(pool), (n, WORDS), generator=gen)]
        for pool in (POS, NEG, NEUTRAL)
    )
    major = torch.where(sentiment[:, None] == 1, pos, neg)
    minor = torch.where(sentiment[:, None] == 1, neg, pos)
    words = torch.where(slot < n_major[:, None], major, torch.where(slot < n_sent[:, None], minor, neutral))
    words = words.gather(1, torch.rand(n, WORDS, generator=gen).argsort(1))  # shuffle each row
    y = torch.where(torch.rand(n, generator=gen) < core, sentiment, 1 - sentiment)
    if rho is None:
        marker = torch.randint(0, 2, (n,), generator=gen)
    else:
        marker = torch.where(torch.rand(n, generator=gen) < rho, y, 1 - y)
    ids = torch.cat([torch.full((n, 1), CLS), (M0 + marker)[:, None], words], dim=1)
    return ids, y


def bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=LENGTH,
        pad_token_id=PAD,
    )


def pretrain(steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(bert_config())
    corpus, _ = make_data(20000, None, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(mlm.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    mlm.train()
    for step in range(1, steps + 1):
        ids = corpus[torch.randint(0, len(corpus), (64,), generator=gen)]
        chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & (ids != CLS)
        labels = ids.masked_fill(~chosen, -100)
        loss = mlm(input_ids=ids.masked_fill(chosen, MASK), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"pre-training step {step}: MLM loss {loss.item():.3f}")
    return {k: v.detach().clone() for k, v in mlm.bert.state_dict().items()}


def encoder(weights: dict[str, torch.Tensor]) -> transformers.BertModel:
    model = transformers.BertModel(bert_config(), add_pooling_layer=False)
    model.load_state_dict(weights)
    return model.eval()


def fit(
    model: nn.Module, forward, train: tuple[torch.Tensor, torch.Tensor], lr: float, steps: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    ids, y = train
    for _ in range(steps):
        pick = torch.randint(0, len(ids), (64,), generator=gen)
        loss = F.cross_entropy(forward(ids[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(forward, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    ids, y = data
    return (forward(ids).argmax(-1) == y).float().mean().item()


def run(
    method: str, weights: dict[str, torch.Tensor], train, tests, steps: int, seed: int
) -> dict[str, float]:
    torch.manual_seed(seed)
    if method == "full":
        model = transformers.BertForSequenceClassification(bert_config())
        model.bert.load_state_dict(weights, strict=False)  # the pooler and classifier start fresh

        def forward(ids):
            return model(input_ids=ids, attention_mask=(ids != PAD).long()).logits

        lr = 3e-4
    elif method == "probe":
        backbone = encoder(weights).requires_grad_(False)
        model = nn.Linear(64, 2)

        def forward(ids):
            with torch.no_grad():
                h = backbone(input_ids=ids).last_hidden_state.mean(1)
            return model(h)

        lr = 1e-2
    else:
        model = al.levi.LEVI(encoder(weights), num_classes=2)

        def forward(ids):
            return model(input_ids=ids, attention_mask=(ids != PAD).long())

        lr = 1e-3
    fit(model, forward, train, lr, steps, seed)
    return {name: accuracy(forward, data) for name, data in tests.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    pre_steps, steps, seeds = (300, 50, [0]) if args.quick else (2000, 400, [0, 1, 2])
    weights = pretrain(pre_steps)
    runs: dict[str, list[dict[str, float]]] = {}
    for core in (1.0, 0.85):
        train = make_data(4000, 0.95, torch.Generator().manual_seed(10), core)
        tests = {
            "id": make_data(2000, 0.95, torch.Generator().manual_seed(11), core),
            "ood": make_data(2000, 0.05, torch.Generator().manual_seed(12), core),
        }
        for method in ("full", "probe", "levi"):
            runs[f"core={core} {method}"] = [
                run(method, weights, train, tests, steps, seed) for seed in seeds
            ]
            print(core, method, runs[f"core={core} {method}"])
    print("\n| regime, method | ID accuracy (mean, min–max) | OOD accuracy (mean, min–max) |")
    print("| --- | --- | --- |")
    summary = {}
    for key, rs in runs.items():
        summary[key] = {}
        cells = []
        for split in ("id", "ood"):
            vals = [r[split] for r in rs]
            summary[key][split] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals)}
            cells.append(f"{statistics.mean(vals):.3f} ({min(vals):.3f}–{max(vals):.3f})")
        print(f"| {key} | {cells[0]} | {cells[1]} |")
    if not args.quick:
        out = ROOT / "benchmarks/results/levi_ood.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "runs": runs,
                    "summary": summary,
                    "steps": steps,
                    "seeds": seeds,
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
