"""LoRA on MoE experts on CPU: adapterlab ("all-experts") vs peft (`target_parameters`), interleaved.

Model: a Qwen3-MoE-shaped decoder (hidden 256, 8 experts of intermediate 128, top-2, 2 layers,
vocab 1024), fp32, 2 threads, batch 4x64 random token ids, loss = model(ids, labels=ids).loss;
LoRA r=8 / alpha=16 on every `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`, the same
factors in both (B ~ N(0, 0.01), so the update is not zero).

- step time: forward + backward (grads set to None, no optimizer). The two variants run once per
  round, in alternating order; the ratio is the median over rounds of ours / peft.
- saved activations: bytes of the tensors autograd saves during one training forward
  (torch.autograd.graph.saved_tensors_hooks), each storage once, parameters and buffers left out.

    python benchmarks/moe_cpu.py              # 15 rounds: prints and writes benchmarks/results/moe_cpu.json
    python benchmarks/moe_cpu.py --rounds 3   # a short run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import peft
import torch
import transformers
from torch import nn

import adapterlab as al

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/moe_cpu.json"
THREADS, BATCH, SEQ, VOCAB, R, ALPHA, B_STD = 2, 4, 64, 1024, 8, 16, 0.01
PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def qwen3_moe() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def ours() -> nn.Module:
    model = al.inject(qwen3_moe(), "lora", targets="all-experts", r=R, alpha=ALPHA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, delta in al.model.deltas(model, "default"):
            delta.lora_B.weight.copy_(torch.randn(delta.lora_B.weight.shape, generator=gen) * B_STD)
    return model


def theirs(reference: nn.Module) -> nn.Module:
    """peft's LoRA with the factors of `reference` (our adapter), in peft's layout."""
    model = peft.get_peft_model(
        qwen3_moe(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=PARAMS)
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # al.save writes peft's layout; peft reads it back
        al.save(reference, tmp)
        peft.set_peft_model_state_dict(model, peft.load_peft_weights(tmp))
    return model


def step(model: nn.Module, ids: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    model(input_ids=ids, labels=ids).loss.backward()


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    a = ours().train()
    b = theirs(a).train()
    with torch.no_grad():
        diff = (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()
    variants = {"ours": a, "peft": b}
    for model in variants.values():  # warm-up
        step(model, ids)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in sorted(variants, reverse=bool(r % 2)):
            start = time.perf_counter()
            step(variants[name], ids)
            times[name].append(time.perf_counter() - start)
    ratios = [x / y for x, y in zip(times["ours"], times["peft"], strict=True)]
    saved = {name: saved_bytes(model, ids) for name, model in variants.items()}
    result = {
        "command": f"python benchmarks/moe_cpu.py --rounds {args.rounds}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "max_output_difference": diff,
        "step_ms_median": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "step_ratio_ours_over_peft": statistics.median(ratios),
        "saved_activation_MiB": {n: b / 2**20 for n, b in saved.items()},
        "saved_ratio_ours_over_peft": saved["ours"] / saved["peft"],
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
