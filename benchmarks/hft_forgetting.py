"""HFT vs full fine-tuning: learn task B on a small Llama that knows task A; how much of A is kept.

Setup (CPU, fp32, 1 intra-op thread, no download):
- Llama: hidden 128, FFN 256, 4 layers, 4 heads (MHA), vocab 64, sequences of 24 tokens.
- A sequence is a task marker (token 0 = task A, token 1 = task B) followed by x₀ … x₂₂ with
  x₀ random and x_{i+1} = f(x_i) over 62 values: f_A(x) = (5x + 3) mod 62, f_B(x) = (7x + 11) mod 62.
  Accuracy = greedy next-token accuracy on x₁ … x₂₂ (x₀ is unpredictable), on 512 fresh sequences.
- Pre-training: the model learns task A from scratch (Adam 3e-3, 600 steps of 32 sequences).
- Stage B, from that checkpoint, Adam 1e-3, `--steps` steps of 32 sequences, 3 seeds, accuracy on
  A and B measured after 5, 10, 15, 20, 30, 50 and 100 steps:
  `full`         every parameter trains;
  `full_layers`  every transformer-layer parameter trains (embeddings and LM head frozen, as in HFT);
  `hft`          al.inject(model, "hft", seed=s): half of each layer, chosen per category.
- Step time: forward + backward + Adam step, the three variants interleaved round by round, median
  over rounds (the machine is shared; the times are indicative, the ratios more so).

    python benchmarks/hft_forgetting.py            # writes benchmarks/results/hft_forgetting.json
    python benchmarks/hft_forgetting.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch import nn

import adapterlab as al

ROOT = Path(__file__).resolve().parents[1]
VOCAB, VALUES, SEQ, BATCH = 64, 62, 24, 32
RULES = {"A": (5, 3), "B": (7, 11)}
MARKER = {"A": 0, "B": 1}
VARIANTS = ["full", "full_layers", "hft"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    return transformers.LlamaForCausalLM(cfg)


def sequences(task: str, n: int, gen: torch.Generator) -> torch.Tensor:
    a, b = RULES[task]
    x = torch.empty(n, SEQ - 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VALUES, (n,), generator=gen)
    for i in range(1, SEQ - 1):
        x[:, i] = (a * x[:, i - 1] + b) % VALUES
    return torch.cat([torch.full((n, 1), MARKER[task]), x + 2], dim=1)


def loss_fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, 1:-1]  # predict x₁ … x₂₂ from the prefix
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 2:].flatten())


@torch.no_grad()
def accuracy(model: nn.Module, task: str) -> float:
    model.eval()
    ids = sequences(task, 512, torch.Generator().manual_seed(999))
    pred = model(input_ids=ids).logits[:, 1:-1].argmax(-1)
    return (pred == ids[:, 2:]).float().mean().item()


def train(
    model: nn.Module, task: str, steps: int, lr: float, seed: int, checkpoints: tuple[int, ...] = ()
) -> dict[int, dict[str, float]]:
    """Train on `task`; return {step: accuracy on A and B} at the checkpoints."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    curve = {}
    for step in range(1, steps + 1):
        model.train()
        loss_fn(model, sequences(task, BATCH, gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in checkpoints:
            curve[step] = {"acc_A": accuracy(model, "A"), "acc_B": accuracy(model, "B")}
    return curve


def prepare(variant: str, pretrained: nn.Module, seed: int) -> nn.Module:
    model = copy.deepcopy(pretrained)
    if variant == "full_layers":
        for name, p in model.named_parameters():
            p.requires_grad_(".layers." in name)
    elif variant == "hft":
        al.inject(model, "hft", seed=seed)
    return model


def step_times(pretrained: nn.Module, rounds: int) -> dict[str, float]:
    models = {v: prepare(v, pretrained, 0).train() for v in VARIANTS}
    opts = {
        v: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for v, m in models.items()
    }
    ids = sequences("B", BATCH, torch.Generator().manual_seed(5))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds + 3):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for v in order:
            start = time.perf_counter()
            loss_fn(models[v], ids).backward()
            opts[v].step()
            opts[v].zero_grad(set_to_none=True)
            if r >= 3:  # warm-up rounds are not kept
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pre_steps, steps, seeds, rounds = (60, 25, [0], 10) if args.quick else (600, args.steps, [0, 1, 2], 60)
    checkpoints = tuple(c for c in (5, 10, 15, 20, 30, 50, 100, 300) if c <= steps)
    start = time.time()
    pretrained = make_model()
    train(pretrained, "A", pre_steps, 3e-3, seed=100)
    base = {"acc_A": accuracy(pretrained, "A"), "acc_B": accuracy(pretrained, "B")}
    print(f"after pre-training on A: {base}")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    trainable = {}
    for seed in seeds:
        for v in VARIANTS:
            model = prepare(v, pretrained, seed)
            trainable[v] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            runs[v].append(train(model, "B", steps, 1e-3, seed=seed, checkpoints=checkpoints))
            print(f"seed {seed} {v:12s} {runs[v][-1]}")
    times = step_times(pretrained, rounds)
    summary = {v: {"trainable": trainable[v], "step_ms": times[v], "curve": {}} for v in VARIANTS}
    for v in VARIANTS:
        for c in checkpoints:
            a, b = ([r[c][k] for r in runs[v]] for k in ("acc_A", "acc_B"))
            summary[v]["curve"][c] = {
                "acc_A": statistics.mean(a),
                "acc_A_min": min(a),
                "acc_A_max": max(a),
                "acc_B": statistics.mean(b),
                "acc_B_min": min(b),
                "acc_B_max": max(b),
            }
    print("\n| variant | trainable params | step ms (median) |\n| --- | --- | --- |")
    for v, s in summary.items():
        print(f"| {v} | {s['trainable']:,} | {s['step_ms']:.1f} |")
    print("\naccuracy on B / on A (mean of the seeds) after n steps on B\n")
    print("| steps | " + " | ".join(VARIANTS) + " |\n| --- |" + " --- |" * len(VARIANTS))
    for c in checkpoints:
        cells = " | ".join(
            f"{summary[v]['curve'][c]['acc_B']:.3f} / {summary[v]['curve'][c]['acc_A']:.3f}" for v in VARIANTS
        )
        print(f"| {c} | {cells} |")
    result = {
        "pretrained": base,
        "steps": steps,
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        "torch": torch.__version__,
        "threads": 1,
        "seconds": time.time() - start,
    }
    if not args.quick:
        out = ROOT / "benchmarks/results/hft_forgetting.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
