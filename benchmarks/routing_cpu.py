"""Mixed-adapter batches on CPU: adapterlab `al.routing` vs peft `adapter_names` vs the bare base.

Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 2048), 8 LoRA adapters r=16 on
every linear layer, batch 32×64 with the samples spread round-robin over the adapters. Variants run
interleaved, round by round (order rotating), in one process; we report medians and the median of
per-round ratios to the base. Rounds run only when the CPUs are idle and are rerun where other
processes (or the hypervisor: steal time) took over 0.1 core (`lora_cpu.interleaved`). Also: one
adapter for the whole batch (no routing), and ours' training step (forward + backward) routed vs
one adapter for the whole batch, interleaved the same way.

    python benchmarks/routing_cpu.py [--rounds 15] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from lora_cpu import environment, interleaved, median_ratio  # quiet rounds and provenance, as lora_cpu.py

N_ADAPTERS, RANK, BATCH, SEQ = 8, 16, 32, 64


def build(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
    )
    return LlamaForCausalLM(cfg).eval()


def randomize(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds, batch 8x16 (smoke test)")
    parser.add_argument("--out", default="benchmarks/results/routing_cpu.json")
    args = parser.parse_args()
    batch, seq, rounds = (8, 16, 3) if args.quick else (BATCH, SEQ, args.rounds)
    torch.set_num_threads(2)
    import peft

    import adapterlab as al

    names = [f"task{i}" for i in range(N_ADAPTERS)]
    ids = [names[i % N_ADAPTERS] for i in range(batch)]
    x = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0))

    base = build()
    ours = build()
    for n in names:
        al.inject(ours, "lora", name=n, r=RANK, alpha=2 * RANK)
    randomize(ours)
    theirs = build()
    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    theirs = peft.get_peft_model(theirs, cfg, adapter_name=names[0])
    for n in names[1:]:
        theirs.add_adapter(n, cfg)
    randomize(theirs)
    theirs.eval()

    def ours_routed():
        with al.routing(ours, ids):
            ours(input_ids=x)

    def ours_single():
        ours(input_ids=x)

    variants = {
        "base": lambda: base(input_ids=x),
        "ours_routed": ours_routed,
        "peft_adapter_names": lambda: theirs(input_ids=x, adapter_names=ids),
        "ours_single": ours_single,
        "peft_single": lambda: theirs(input_ids=x),
    }
    al.set_active(ours, [names[0]])
    theirs.set_adapter(names[0])
    with torch.inference_mode():
        times, infer_stats = interleaved(variants, rounds, warmup=1, budget_s=3 * rounds)

    def routed_train_step():
        ours.zero_grad(set_to_none=True)
        with al.routing(ours, ids):
            ours(input_ids=x, labels=x).loss.backward()

    def single_train_step():
        ours.zero_grad(set_to_none=True)
        ours(input_ids=x, labels=x).loss.backward()

    for n, p in ours.named_parameters():
        p.requires_grad_(".deltas." in n)
    ours.train()
    steps = {"routed": routed_train_step, "single": single_train_step}
    train_rounds = max(4, rounds // 2)
    train, train_stats = interleaved(steps, train_rounds, warmup=1, budget_s=6 * train_rounds)
    train_ratio = median_ratio(train["routed"], train["single"])

    ratio = {k: median_ratio(times[k], times["base"]) for k in variants}
    result = {
        "config": environment(
            "python " + " ".join(sys.argv),
            {"batch": batch, "seq": seq, "adapters": N_ADAPTERS, "rank": RANK, "rounds": rounds},
        ),
        "rounds": {"inference": infer_stats, "train": train_stats},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_base": ratio,
        "train_step_s": {k: statistics.median(v) for k, v in train.items()},
        "routed_train_x_single": train_ratio,
        "targets": {
            "ours_routed <= 1.15x base": ratio["ours_routed"] <= 1.15,
            "routed training step <= 1.3x single-adapter step": train_ratio <= 1.3,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':<22}{'median ms':>12}{'x base':>10}")
    for k in variants:
        print(f"{k:<22}{1e3 * result['median_s'][k]:>12.1f}{ratio[k]:>10.3f}")
    steps_ms = {k: round(1e3 * v, 1) for k, v in result["train_step_s"].items()}
    print(f"training step (ours, fwd+bwd) ms: {steps_ms}; routed / single: {train_ratio:.3f}")
    for target, ok in result["targets"].items():
        print(f"{'PASS' if ok else 'FAIL'}: {target}")


if __name__ == "__main__":
    main()
