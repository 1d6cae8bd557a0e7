"""HFT vs full fine-tuning: a small Llama pre-trained on several tasks learns a new one; how much of
the old tasks is kept, at equal accuracy on the new task, and what a step costs.

Setup (CPU, fp32, 1 intra-op thread, no download):
- Llama: hidden 64, FFN 128, 4 layers, 4 heads (MHA), sequences of 16 tokens.
- A sequence is a task marker (token t) followed by x₀ … x₁₄ with x₀ random and
  x_{i+1} = (a_t·x_i + b_t) mod 48. Accuracy = greedy next-token accuracy on x₁ … x₁₄ (x₀ is
  unpredictable) on 64 fixed sequences per task (896 predictions).
- Pre-training, per seed: the model learns the 4 old tasks together from scratch (each sequence a
  random old task; Adam 3e-3, `pre_steps` steps of 32 sequences).
- New task, from that checkpoint: Adam `lr`, `steps` steps of 32 sequences of the new task only;
  accuracy on every task every `every` steps. Variants:
  `full`         every parameter trains;
  `full_slow`    the same at half the learning rate (learning the new task as slowly as HFT does:
                 does freezing help, or only learning more slowly?);
  `full_layers`  every transformer-layer parameter trains (embeddings and head frozen, as in HFT);
  `dense_layers` control: a dense ΔW (adapterlab's "dense" adapter) on every module HFT chooses
                 from; must track `full_layers` (same update, through the delta machinery);
  `hft`          al.inject(model, "hft", seed=s): half of each layer, chosen per category.
- Retention = mean old-task accuracy / its value after pre-training, read at the first checkpoint
  where the new task's accuracy reaches each target (0.5, 0.8, 0.95), and at the end.
- Step time: forward + backward + Adam step, full / full_layers / hft interleaved round by round,
  median over rounds (the machine is shared; the ratios are more trustworthy than the times).

    python benchmarks/hft_forgetting.py          # writes benchmarks/results/hft_forgetting.json
    python benchmarks/hft_forgetting.py --tiny   # seconds: a smoke run, writes nothing
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _repro  # benchmarks/_repro.py: the shared command line and provenance
import torch
import transformers
from torch import nn

import adapterlab as al
from adapterlab.methods.hft import ARCHITECTURES, layer_groups

ROOT = Path(__file__).resolve().parents[1]
VALUES, SEQ, BATCH = 48, 16, 32
OLD_RULES = [(5, 3), (7, 11), (11, 5), (13, 17)]
NEW_RULE = (19, 7)
RULES = OLD_RULES + [NEW_RULE]  # task t: marker token t, rule RULES[t]
NEW = len(OLD_RULES)
VOCAB = len(RULES) + VALUES
VARIANTS = ["full", "full_slow", "full_layers", "dense_layers", "hft"]
TARGETS = (0.5, 0.8, 0.95)


@dataclass
class Setup:
    hidden: int = 64
    layers: int = 4
    pre_steps: int = 1000
    steps: int = 100
    every: int = 4
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_n: int = 64
    rounds: int = 40
    variants: tuple[str, ...] = tuple(VARIANTS)


TINY = Setup(hidden=32, layers=2, pre_steps=10, steps=6, every=3, seeds=(0,), eval_n=16, rounds=2)


def make_model(s: Setup, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s.hidden,
        intermediate_size=2 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    return transformers.LlamaForCausalLM(cfg)


def sequences(tasks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One sequence per entry of `tasks` (task ids)."""
    n = len(tasks)
    a = torch.tensor([RULES[t][0] for t in tasks.tolist()])
    b = torch.tensor([RULES[t][1] for t in tasks.tolist()])
    x = torch.empty(n, SEQ - 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VALUES, (n,), generator=gen)
    for i in range(1, SEQ - 1):
        x[:, i] = (a * x[:, i - 1] + b) % VALUES
    return torch.cat([tasks[:, None], x + len(RULES)], dim=1)


def loss_fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, 1:-1]  # predict x₁ … x₁₄ from the prefix
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 2:].flatten())


@torch.no_grad()
def accuracy(model: nn.Module, n: int) -> list[float]:
    """Next-token accuracy per task (old tasks, then the new one)."""
    model.eval()
    gen = torch.Generator().manual_seed(999)
    ids = sequences(torch.arange(len(RULES)).repeat_interleave(n), gen)
    pred = model(input_ids=ids).logits[:, 1:-1].argmax(-1)
    return (pred == ids[:, 2:]).float().view(len(RULES), -1).mean(-1).tolist()


def pretrain(s: Setup, seed: int) -> nn.Module:
    model = make_model(s, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(s.pre_steps):
        loss_fn(model, sequences(torch.randint(0, NEW, (BATCH,), generator=gen), gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def prepare(variant: str, pretrained: nn.Module, seed: int) -> nn.Module:
    model = copy.deepcopy(pretrained)
    if variant == "full_layers":
        for name, p in model.named_parameters():
            p.requires_grad_(".layers." in name)
    elif variant == "dense_layers":
        paths = [
            p for _, cats in layer_groups(model, ARCHITECTURES["llama"]) for ps in cats.values() for p in ps
        ]
        al.inject(model, "dense", targets=paths)
    elif variant == "hft":
        al.inject(model, "hft", seed=seed)
    return model


def finetune(s: Setup, variant: str, pretrained: nn.Module, seed: int) -> dict:
    """Train on the new task; the accuracy curve ({step: [acc per task]}) and the trainable count."""
    model = prepare(variant, pretrained, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr / 2 if variant == "full_slow" else s.lr)
    gen = torch.Generator().manual_seed(200 + seed)
    curve = {0: accuracy(model, s.eval_n)}
    for step in range(1, s.steps + 1):
        model.train()
        loss_fn(model, sequences(torch.full((BATCH,), NEW), gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % s.every == 0:
            curve[step] = accuracy(model, s.eval_n)
    return {"trainable": sum(p.numel() for p in params), "curve": curve}


def read_at_targets(curve: dict, targets: tuple[float, ...], new, retention) -> dict:
    """Per accuracy target: the first checkpoint whose new-task accuracy `new(point)` reaches it, with
    `retention(point)` there (None if never reached); and the same at the last checkpoint ("end")."""

    def at(step: int) -> dict:
        return {"step": step, "new": new(curve[step]), "retention": retention(curve[step])}

    out: dict = {}
    for target in targets:
        hit = next((st for st in sorted(curve) if new(curve[st]) >= target), None)
        out[str(target)] = None if hit is None else at(hit)
    out["end"] = at(max(curve))
    return out


def at_targets(curve: dict[int, list[float]], pre_old: float) -> dict:
    """Retention of the old tasks at the first checkpoint reaching each new-task accuracy target."""
    return read_at_targets(
        curve, TARGETS, lambda acc: acc[NEW], lambda acc: statistics.mean(acc[:NEW]) / pre_old
    )


def targets_line(variant: str, at: dict) -> str:
    """One log line: the step and retention at each target of `read_at_targets`."""
    return f"  {variant:12s} " + "  ".join(
        f"{k}: " + ("-" if a is None else f"step {a['step']} ret {a['retention']:.2f}") for k, a in at.items()
    )


def step_times(s: Setup, pretrained: nn.Module) -> dict[str, float]:
    names = ["full", "full_layers", "hft"]
    models = {v: prepare(v, pretrained, 0).train() for v in names}
    opts = {
        v: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for v, m in models.items()
    }
    ids = sequences(torch.full((BATCH,), NEW), torch.Generator().manual_seed(5))
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(s.rounds + 3):
        for v in names[r % 3 :] + names[: r % 3]:
            start = time.perf_counter()
            loss_fn(models[v], ids).backward()
            opts[v].step()
            opts[v].zero_grad(set_to_none=True)
            if r >= 3:  # warm-up rounds are not kept
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}


def summarize(
    records: list[dict],
    variants: tuple[str, ...],
    targets: tuple[float, ...] = TARGETS,
    keys=("retention", "step"),
) -> dict:
    """Per variant: trainable parameters, and per target how many seeds reached it and the spread
    of each of `keys` over those seeds."""
    summary: dict = {}
    for v in variants:
        rows = [r["runs"][v]["at"] for r in records]
        entry: dict = {"trainable": records[0]["runs"][v]["trainable"]}
        for key in [str(t) for t in targets] + ["end"]:
            got = [row[key] for row in rows if row[key] is not None]
            entry[key] = {"reached": len(got)} | {
                k: _repro.spread([g[k] for g in got]) if got else None for k in keys
            }
        summary[v] = entry
    return summary


def run(s: Setup, log=print) -> dict:
    torch.set_num_threads(1)
    start = time.time()
    records = []
    pretrained = None
    for seed in s.seeds:
        pretrained = pretrain(s, seed)
        pre = accuracy(pretrained, s.eval_n)
        pre_old = statistics.mean(pre[:NEW])
        rec: dict = {"seed": seed, "pretrained": pre, "runs": {}}
        log(
            f"seed {seed}: after pre-training, old tasks {[round(a, 3) for a in pre[:NEW]]}, new {pre[NEW]:.3f}"
        )
        for v in s.variants:
            r = finetune(s, v, pretrained, seed)
            r["at"] = at_targets(r["curve"], pre_old)
            rec["runs"][v] = r
            log(targets_line(v, r["at"]))
        records.append(rec)
    assert pretrained is not None
    times = step_times(s, pretrained)
    log(f"step ms: {times}")
    return {
        "setup": asdict(s),
        "rules": {"old": OLD_RULES, "new": NEW_RULE, "values": VALUES},
        "records": records,
        "summary": summarize(records, s.variants),
        "step_ms": times,
        "step_ratio_hft_vs_full": times["hft"] / times["full"],
        **_repro.provenance(start),
    }


def main() -> None:
    _repro.main(__doc__, "hft_forgetting", run, TINY, Setup)


if __name__ == "__main__":
    main()
