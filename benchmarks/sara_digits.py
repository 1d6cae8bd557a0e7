"""SaRA's three claims on a small pre-trained classifier (scikit-learn's digits; no download).

Setup (CPU, fp32, 1 intra-op thread):
- An MLP 64 → 256 → 256 → 10 (ReLU) is pre-trained on digits 0–4 (all their training images,
  full-batch Adam 1e-3, 400 steps). Images are split 50/50 per class into train and test (seeded).
- Then it learns digits 5–9 from `--shots` training images per class (few-shot), full-batch Adam,
  `--steps` steps. Accuracy is task-aware: on old-class test images, argmax over logits 0–4; on
  new-class test images, argmax over logits 5–9 (so "forgetting" measures damage to the features
  and the old rows of the head, not the head's bias towards the newest classes). 10-way accuracy
  is in the JSON too.

Claims tested (Hu et al., ICLR 2025), one pre-trained model per seed:
(a) `prune`: zeroing each weight's smallest-|θ| 10% (20%, 30%, 50%) of entries barely changes the
    pre-trained accuracy. Controls: a random 10% and the largest 10%.
(b) `finetune`: SaRA (density 0.1, λ = 0) reaches the new classes within ~2 points of full
    fine-tuning and forgets less. Controls: SaRA at density 1 (must track full FT of the weights,
    `full_weights`: the same update through the sparse machinery), and the entries outside the
    mask must be unchanged after merging. `full_hi`: full FT at SaRA's learning rate.
(c) `rank`: raising λ lowers the effective rank of ΔW while accuracy holds. λ is given relative
    to the task loss: λ = λ̃ · L₀, with L₀ the cross-entropy on the new classes at the start of
    fine-tuning. Under Adam, scaling the loss and λ together leaves the update unchanged (up to ε),
    so λ̃ is the quantity that transfers between tasks. Effective rank: exp of the entropy of the
    normalised singular values of ΔW (the 256×256 hidden weight), and the count above 1% of the
    largest.

    python benchmarks/sara_digits.py          # writes benchmarks/results/sara_digits.json (~1 min of CPU)
    python benchmarks/sara_digits.py --tiny   # seconds: a smoke run, writes nothing
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _repro  # benchmarks/_repro.py: the shared command line and provenance
import torch
from torch import Tensor, nn

import adapterlab as al

ROOT = Path(__file__).resolve().parents[1]
OLD, NEW = list(range(5)), list(range(5, 10))


@dataclass
class Setup:
    hidden: int = 256
    pre_steps: int = 400
    steps: int = 150
    shots: int = 10
    lr: float = 1e-3
    sara_lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    prune_fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    lambdas: tuple[float, ...] = (0.0, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)  # λ̃ = λ / L₀
    extra: dict = field(default_factory=dict)


TINY = Setup(hidden=32, pre_steps=20, steps=10, seeds=(0,), prune_fractions=(0.1,), lambdas=(0.0, 0.1))


def load(seed: int) -> dict[str, Tensor]:
    """Digits, scaled to [0, 1], split 50/50 per class (seeded)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    gen = torch.Generator().manual_seed(1000 + seed)
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        train.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2 :])
    tr, te = torch.cat(train), torch.cat(test)
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def subset(x: Tensor, y: Tensor, classes: list[int], shots: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """The images of `classes`; the first `shots` of each (in a seeded order) when given."""
    gen = torch.Generator().manual_seed(2000 + seed)
    keep = []
    for c in classes:
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        keep.append(idx if shots is None else idx[:shots])
    k = torch.cat(keep)
    return x[k], y[k]


def make_mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def restricted_loss(model: nn.Module, x: Tensor, y: Tensor, classes: list[int]) -> Tensor:
    """Cross-entropy over the logits of `classes` only (consecutive ids)."""
    return nn.functional.cross_entropy(model(x)[:, classes], y - classes[0])


@torch.no_grad()
def accuracies(model: nn.Module, data: dict[str, Tensor]) -> dict[str, float]:
    """Task-aware accuracy on the old and the new classes' test images, and 10-way accuracy."""
    model.eval()
    x, y = data["x_test"], data["y_test"]
    logits = model(x)
    out = {}
    for name, classes in (("old", OLD), ("new", NEW)):
        m = (y >= classes[0]) & (y <= classes[-1])
        out[name] = (logits[m][:, classes].argmax(-1) + classes[0] == y[m]).float().mean().item()
        out[f"{name}_10way"] = (logits[m].argmax(-1) == y[m]).float().mean().item()
    return out


def pretrain(s: Setup, data: dict[str, Tensor], seed: int) -> nn.Sequential:
    model = make_mlp(s.hidden, seed)
    x, y = subset(data["x_train"], data["y_train"], OLD, None, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(s.pre_steps):
        restricted_loss(model, x, y, OLD).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def prune(model: nn.Sequential, data: dict[str, Tensor], fraction: float, how: str, seed: int) -> float:
    """Old-class accuracy after zeroing `fraction` of each weight's entries: the smallest |θ|, the
    largest, or a random set."""
    pruned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3000 + seed)
    for lin in linears(pruned):
        w = lin.weight
        k = round(fraction * w.numel())
        if how == "random":
            idx = torch.randperm(w.numel(), generator=gen)[:k]
        else:
            idx = w.abs().flatten().argsort(descending=how == "largest")[:k]
        w.view(-1)[idx] = 0
    return accuracies(pruned, data)["old"]


def effective_rank(dw: Tensor) -> dict[str, float]:
    s = torch.linalg.svdvals(dw.double())
    if float(s.max()) == 0:
        return {"erank": 0.0, "rank_1pct": 0, "nuclear": 0.0}
    p = s / s.sum()
    p = p[p > 0]
    return {
        "erank": float(torch.exp(-(p * p.log()).sum())),
        "rank_1pct": int((s > 0.01 * s.max()).sum()),
        "nuclear": float(s.sum()),
    }


def finetune(
    s: Setup, base: nn.Sequential, data: dict[str, Tensor], seed: int, variant: str, lam_rel: float = 0.0
) -> dict:
    """Fine-tune a copy of `base` on the few-shot new classes; returns accuracies, ΔW statistics
    and, for SaRA, the largest change outside the mask."""
    model = copy.deepcopy(base)
    x, y = subset(data["x_train"], data["y_train"], NEW, s.shots, seed)
    with torch.no_grad():
        l0 = restricted_loss(model, x, y, NEW).item()
    lr = s.lr
    if variant in ("full", "full_hi"):
        params = list(model.parameters())
        lr = s.sara_lr if variant == "full_hi" else s.lr
    elif variant == "full_weights":
        params = [lin.weight for lin in linears(model)]
    else:
        density = 1.0 if variant == "sara_dense" else 0.1
        lr = s.lr if variant == "sara_dense" else s.sara_lr
        al.inject(model, "sara", density=density, nuclear_weight=lam_rel * l0, nuclear_min_dim=s.hidden // 2)
        params = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(s.steps):
        restricted_loss(model, x, y, NEW).backward()
        al.before_step(model, step)  # SaRA: adds λ·∇‖ΔW‖_* for one eligible weight
        opt.step()
        al.after_step(model, step, opt)
        opt.zero_grad(set_to_none=True)
    out: dict = {"variant": variant, "lambda_rel": lam_rel, "lambda": lam_rel * l0, "L0": l0, "lr": lr}
    out["final_loss"] = restricted_loss(model, x, y, NEW).item()
    merged = al.unload(model, merge=True) if variant.startswith("sara") else model
    out.update(accuracies(merged, data))
    hidden_before, hidden_after = linears(base)[1].weight, linears(merged)[1].weight
    out["hidden_dw"] = effective_rank(hidden_after.detach() - hidden_before.detach())
    if variant == "sara":  # control: nothing outside the 10% mask moved
        outside = 0.0
        for b, m in zip(linears(base), linears(merged), strict=True):
            w = b.weight.detach()
            k = round(0.1 * w.numel())
            t = w.abs().flatten().kthvalue(k + 1).values
            moved = (m.weight.detach() - w).abs()
            outside = max(outside, float(moved[w.abs() >= t].max()))
        out["max_change_outside_mask"] = outside
    return out


def run(s: Setup, log=print) -> dict:
    torch.set_num_threads(1)
    start = time.time()
    seeds: list[dict] = []
    for seed in s.seeds:
        data = load(seed)
        base = pretrain(s, data, seed)
        rec: dict = {"seed": seed, "pretrained": accuracies(base, data), "prune": {}, "finetune": {}}
        for how in ("smallest", "random", "largest"):
            rec["prune"][how] = {str(f): prune(base, data, f, how, seed) for f in s.prune_fractions}
        for variant in ("full", "full_hi", "full_weights", "sara_dense", "sara"):
            rec["finetune"][variant] = finetune(s, base, data, seed, variant)
        rec["rank"] = [finetune(s, base, data, seed, "sara", lam) for lam in s.lambdas]
        log(
            f"seed {seed}: pre {rec['pretrained']['old']:.3f}; prune {rec['prune']}; "
            + "; ".join(f"{v} new {r['new']:.3f} old {r['old']:.3f}" for v, r in rec["finetune"].items())
        )
        for r in rec["rank"]:
            log(
                f"  λ̃={r['lambda_rel']:g} (λ={r['lambda']:.3g}): erank {r['hidden_dw']['erank']:.1f} "
                f"rank1% {r['hidden_dw']['rank_1pct']} new {r['new']:.3f} old {r['old']:.3f}"
            )
        seeds.append(rec)
    summary: dict = {
        "pretrained_old": _repro.spread([r["pretrained"]["old"] for r in seeds]),
        "prune": {
            how: {f: _repro.spread([r["prune"][how][f] for r in seeds]) for f in seeds[0]["prune"][how]}
            for how in seeds[0]["prune"]
        },
        "finetune": {
            v: {
                k: _repro.spread([r["finetune"][v][k] for r in seeds])
                for k in ("new", "old", "new_10way", "old_10way")
            }
            for v in seeds[0]["finetune"]
        },
        "rank": [
            {
                "lambda_rel": lam,
                "lambda": _repro.spread([r["rank"][i]["lambda"] for r in seeds]),
                "erank": _repro.spread([r["rank"][i]["hidden_dw"]["erank"] for r in seeds]),
                "rank_1pct": _repro.spread([r["rank"][i]["hidden_dw"]["rank_1pct"] for r in seeds]),
                "nuclear": _repro.spread([r["rank"][i]["hidden_dw"]["nuclear"] for r in seeds]),
                "final_loss": _repro.spread([r["rank"][i]["final_loss"] for r in seeds]),
                "new": _repro.spread([r["rank"][i]["new"] for r in seeds]),
                "old": _repro.spread([r["rank"][i]["old"] for r in seeds]),
            }
            for i, lam in enumerate(s.lambdas)
        ],
        "max_change_outside_mask": max(r["finetune"]["sara"]["max_change_outside_mask"] for r in seeds),
        "sara_dense_vs_full_weights_new": max(
            abs(r["finetune"]["sara_dense"]["new"] - r["finetune"]["full_weights"]["new"]) for r in seeds
        ),
    }
    return {
        "setup": asdict(s),
        "seeds": seeds,
        "summary": summary,
        **_repro.provenance(start),
    }


def main() -> None:
    _repro.main(
        __doc__,
        "sara_digits",
        run,
        TINY,
        Setup,
        show=lambda r: {k: r["summary"][k] for k in ("prune", "finetune")},
    )


if __name__ == "__main__":
    main()
