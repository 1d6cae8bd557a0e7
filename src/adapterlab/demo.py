"""`adapterlab demo`: LoRA on a small Llama built from a config (no download), end to end."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

VOCAB, SEQ = 64, 32


def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(cfg).eval()


def batch(gen: torch.Generator, size: int) -> torch.Tensor:
    """Sequences of the rule t[i+1] = (5·t[i] + 3) mod VOCAB from random starts: the random base
    model cannot predict them; a LoRA learns the rule."""
    seq = torch.empty(size, SEQ, dtype=torch.long)
    seq[:, 0] = torch.randint(0, VOCAB, (size,), generator=gen)
    for i in range(1, SEQ):
        seq[:, i] = (5 * seq[:, i - 1] + 3) % VOCAB
    return seq


def run(out_dir: str | Path = "adapterlab-demo", steps: int = 300, seed: int = 0) -> dict[str, float]:
    import adapterlab as al

    started = time.perf_counter()
    model = make_model(seed)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    al.inject(model, "lora", r=8, alpha=16, targets="all-linear")
    summary = al.trainable_summary(model)
    print(f"LoRA r=8 on every Linear of a 2-layer Llama: {summary}")

    gen = torch.Generator().manual_seed(seed)
    held_out = batch(gen, 64)

    def loss_on(x: torch.Tensor) -> float:
        with torch.no_grad():
            return model(input_ids=x, labels=x).loss.item()

    before = loss_on(held_out)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in tqdm(range(steps), desc="training LoRA", unit="step"):
        x = batch(gen, 16)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    after = loss_on(held_out)
    print(f"held-out loss: {before:.3f} before -> {after:.3f} after")

    path = al.save(model, out_dir)
    fresh = make_model(seed)
    fresh.load_state_dict(base_state)
    al.load(fresh, path)
    with torch.no_grad():
        unmerged = fresh(input_ids=held_out).logits
        reload_diff = (unmerged - model(input_ids=held_out).logits).abs().max().item()
        al.merge(fresh)
        merged_diff = (fresh(input_ids=held_out).logits - unmerged).abs().max().item()
    print(f"reloaded adapter vs trained model: max |Δ logits| = {reload_diff:.2e}")
    print(f"merged vs unmerged: max |Δ logits| = {merged_diff:.2e}")
    print(f"adapter files: {', '.join(str(p) for p in sorted(Path(path).resolve().iterdir()))}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    if not (after < before and reload_diff <= 1e-5 and merged_diff <= 1e-4):
        raise SystemExit("demo check failed: the adapter did not train, reload or merge as it should")
    return {
        "loss_before": before,
        "loss_after": after,
        "reload_diff": reload_diff,
        "merged_diff": merged_diff,
    }
