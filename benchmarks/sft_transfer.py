"""LT-SFT reproduction: zero-shot cross-lingual transfer by composing a language SFT with a task SFT.

Claim (Ansell et al., ACL 2022): for a target language B, the B-language SFT plus a task SFT
trained on source language A (with the A-language SFT applied) beats the task SFT alone, which
beats a task SFT on a random mask of the same K, which beats chance.

Setup (synthetic, CPU, fp32, 1 thread, no download):
- Concepts 0..C-1 follow one random bigram Markov chain (the shared "meaning"). Language A writes
  concept c as token 1 + c, language B as token 1 + C + π(c): disjoint vocabularies.
- Base: a tiny Llama (hidden 64, 2 layers, untied embeddings) pretrained by causal LM on 93% A
  text, 5% code-switched text (each concept in A or B at random: what aligns the vocabularies)
  and 2% B text, so B is rare, as a low-resource language in a multilingual model.
- Task: is the sentence's last concept in a fixed half of the concepts? Read at the last content
  token (no SEP token the base never saw) by a dense linear head on the final hidden state; the
  head is part of each task SFT, trained dense in both phases (as the official code trains heads).
- Language SFTs: `train_lt_sft` by causal LM on A text and on B text, body = every Linear of the
  Llama plus the token embeddings (the official code masks all body weights but norms), lm_head
  trained dense. Task SFT: on A task data with the A-language SFT active; same body, the head dense.
- Evaluation on held-out B task data (and A, for the task itself): langB + task, task alone, a
  random-mask task SFT with the same K and the same head training (composed with langB, and
  alone), full fine-tuning of everything on A, a head trained on the frozen base, chance.
- The random-mask task SFT and full fine-tuning get as many optimizer steps as LT-SFT's two
  phases together; all runs use AdamW without weight decay.
- Controls that a broken implementation would fail: the language SFTs lower their language's LM
  loss; the task is learned on held-out A; the merged langB + task model scores exactly what the
  unmerged one scores, and unmerging restores the base bit for bit.

    python benchmarks/sft_transfer.py           # 3 seeds, ~2 min of CPU: benchmarks/results/sft_transfer.json
    python benchmarks/sft_transfer.py --tiny    # a smoke run (seconds), writes nothing
    python benchmarks/sft_transfer.py --set density=0.01 --out X.json   # a sensitivity run
    python benchmarks/plots.py                  # docs/img/sft_transfer.png from the JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import adapterlab as al
from adapterlab.methods.sft import select_top_k, train_lt_sft
from adapterlab.model import adapter_layers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/sft_transfer.json"
BODY = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
SETTINGS = {  # name: (adapters active, evaluated on)
    "A: langA + task": (["langA", "task"], "A"),
    "B: langB + task": (["langB", "task"], "B"),
    "B: task alone": (["task"], "B"),
    "B: langB + random-mask task": (["langB", "random", "random_head"], "B"),
    "B: random-mask task alone": (["random", "random_head"], "B"),
}


@dataclass
class Setup:
    """Sizes and schedule; `tiny()` is the smoke-test version."""

    concepts: int = 24
    length: int = 12
    batch: int = 32
    hidden: int = 64
    mix: tuple[float, float, float] = (0.93, 0.05, 0.02)  # A, code-switched, B in pre-training
    pretrain_steps: int = 600
    lang_steps: int = 150  # per phase (full, then sparse)
    task_steps: int = 150  # per phase; random mask and full FT get 2× (equal optimizer steps)
    lang_lr: float = 2e-3
    task_lr: float = 1e-3
    density: float = 0.05
    task_embeddings: bool = True  # False: task SFTs (LT and random) leave the embeddings alone
    xor: bool = False  # True: label = last concept in one half XOR the one before in another
    eval_batches: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def tiny(cls) -> Setup:
        return cls(
            concepts=6,
            length=6,
            batch=8,
            hidden=16,
            pretrain_steps=6,
            lang_steps=3,
            task_steps=3,
            eval_batches=2,
            seeds=(0,),
        )


class World:
    """The shared concept chain, its two renderings, and the task's YES half."""

    def __init__(self, setup: Setup, seed: int) -> None:
        self.s, c = setup, setup.concepts
        self.gen = torch.Generator().manual_seed(1000 + seed)
        self.next = torch.stack([torch.randperm(c, generator=self.gen)[:3] for _ in range(c)])
        self.probs = torch.softmax(torch.randn(c, 3, generator=self.gen) * 2, dim=1)
        self.perm = torch.randperm(c, generator=self.gen)
        last = torch.bincount(self.concepts(4000)[:, -1], minlength=c)
        self.yes = last.argsort(descending=True)[0::2]  # alternate by frequency: about half are YES
        self.odd = torch.randperm(c, generator=self.gen)[: c // 2]  # the second feature (XOR)

    def concepts(self, n: int) -> torch.Tensor:
        seq = torch.empty(n, self.s.length, dtype=torch.long)
        seq[:, 0] = torch.randint(0, self.s.concepts, (n,), generator=self.gen)
        for t in range(1, self.s.length):
            pick = torch.multinomial(self.probs[seq[:, t - 1]], 1, generator=self.gen).squeeze(1)
            seq[:, t] = self.next[seq[:, t - 1], pick]
        return seq

    def render(self, concepts: torch.Tensor, lang: str) -> torch.Tensor:
        return 1 + concepts if lang == "A" else 1 + self.s.concepts + self.perm[concepts]

    def text(self, lang: str) -> torch.Tensor:
        concepts = self.concepts(self.s.batch)
        if lang != "mixed":
            return self.render(concepts, lang)
        in_b = torch.rand(concepts.shape, generator=self.gen) < 0.5
        return torch.where(in_b, self.render(concepts, "B"), self.render(concepts, "A"))

    def task(self, lang: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(n):
            concepts = self.concepts(self.s.batch)
            label = torch.isin(concepts[:, -1], self.yes)
            if self.s.xor:
                label = label ^ torch.isin(concepts[:, -2], self.odd)
            out.append((self.render(concepts, lang), label.long()))
        return out


class Classifier(nn.Module):
    """The pretrained Llama (`lm`) and a linear task head on the last position's final hidden state."""

    def __init__(self, lm: transformers.LlamaForCausalLM) -> None:
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lm.model(input_ids=ids).last_hidden_state[:, -1])


def lm_loss(model: Classifier, ids: torch.Tensor) -> torch.Tensor:
    return model.lm(input_ids=ids, labels=ids).loss


def task_loss(model: Classifier, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, label = batch
    return nn.functional.cross_entropy(model(ids), label)


@torch.no_grad()
def accuracy(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    hits = sum(int((model(ids).argmax(1) == label).sum()) for ids, label in data)
    return hits / sum(len(label) for _, label in data)


@torch.no_grad()
def mean_lm_loss(model: Classifier, data: list[torch.Tensor]) -> float:
    return statistics.mean(float(lm_loss(model, ids)) for ids in data)


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train(model: nn.Module, params: list[nn.Parameter], data: list, loss, steps: int, lr: float) -> None:
    opt = adamw(lr)(params)
    for step in range(steps):
        opt.zero_grad()
        loss(model, data[step % len(data)]).backward()
        opt.step()


def pretrain(world: World, s: Setup, seed: int) -> Classifier:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=1 + 2 * s.concepts,
        hidden_size=s.hidden,
        intermediate_size=2 * s.hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=s.length,
        tie_word_embeddings=False,
    )
    model = Classifier(transformers.LlamaForCausalLM(config))
    opt = torch.optim.AdamW(model.lm.parameters(), lr=3e-3, weight_decay=0.0)
    langs = torch.multinomial(torch.tensor(s.mix), s.pretrain_steps, replacement=True, generator=world.gen)
    for lang in langs.tolist():
        opt.zero_grad()
        lm_loss(model, world.text(["A", "mixed", "B"][lang])).backward()
        opt.step()
    return model.requires_grad_(False)


def task_body(s: Setup) -> list[str]:
    return BODY if s.task_embeddings else BODY[:-1]


def random_mask_task(model: Classifier, k: int, data: list, s: Setup, seed: int) -> None:
    """Task SFT on K entries drawn uniformly over the same body, plus a dense head ("random_head"),
    trained for as many optimizer steps as LT-SFT's two phases together."""
    al.inject(model, "sft", targets=task_body(s), name="random")
    al.inject(model, "dense", targets=["head"], name="random_head")
    layers = {path: layer for path, layer in adapter_layers(model) if "random" in layer.deltas}
    gen = torch.Generator().manual_seed(seed)
    noise = {path: torch.rand(layer.base_layer.weight.shape, generator=gen) for path, layer in layers.items()}
    for path, support in select_top_k(noise, k).items():
        layers[path].deltas["random"].set_support(support)
    al.set_active(model, ["langA", "random", "random_head"])
    params = [p for n, p in model.named_parameters() if ".deltas.random" in n]
    for p in params:
        p.requires_grad_(True)
    train(model, params, data, task_loss, 2 * s.task_steps, s.task_lr)
    model.requires_grad_(False)


def baselines(base: Classifier, task_a: list, test: dict, s: Setup) -> dict[str, float]:
    """Full fine-tuning of everything (body, embeddings, head) and a head on the frozen base."""
    out = {}
    full = copy.deepcopy(base).requires_grad_(True)
    train(full, list(full.parameters()), task_a, task_loss, 2 * s.task_steps, s.task_lr)
    out["A: full fine-tuning"], out["B: full fine-tuning"] = (
        accuracy(full, test["A"]),
        accuracy(full, test["B"]),
    )
    probe = copy.deepcopy(base)
    train(
        probe, list(probe.head.requires_grad_(True).parameters()), task_a, task_loss, 2 * s.task_steps, 1e-2
    )
    out["A: head on frozen base"], out["B: head on frozen base"] = (
        accuracy(probe, test["A"]),
        accuracy(probe, test["B"]),
    )
    return out


def one_seed(s: Setup, seed: int) -> dict[str, Any]:
    world = World(s, seed)
    model = pretrain(world, s, seed)
    lm_eval = {lang: [world.text(lang) for _ in range(s.eval_batches)] for lang in "AB"}
    test = {lang: world.task(lang, s.eval_batches) for lang in "AB"}
    task_a = world.task("A", 40)
    out: dict[str, Any] = baselines(model, task_a, test, s)
    theta = [(p, p.detach().clone()) for p in model.parameters()]  # the same objects once wrapped
    controls: dict[str, Any] = {}
    for lang in "AB":
        before = mean_lm_loss(model, lm_eval[lang])
        al.set_active(model, [])  # each language SFT is trained on the bare base
        train_lt_sft(
            model,
            [world.text(lang) for _ in range(40)],
            lm_loss,
            al.SFTConfig(density=s.density, targets=BODY),
            name=f"lang{lang}",
            steps=s.lang_steps,
            heads=["lm_head"],
            make_optimizer=adamw(s.lang_lr),
        )
        model.requires_grad_(False)
        controls[f"LM loss on {lang}: base → lang{lang} SFT"] = [before, mean_lm_loss(model, lm_eval[lang])]
    al.set_active(model, ["langA"])
    res = train_lt_sft(
        model,
        task_a,
        task_loss,
        al.SFTConfig(density=s.density, targets=task_body(s)),
        name="task",
        steps=s.task_steps,
        heads=["head"],
        make_optimizer=adamw(s.task_lr),
    )
    model.requires_grad_(False)
    random_mask_task(model, res.k, task_a, s, seed)
    for label, (active, lang) in SETTINGS.items():
        al.set_active(model, active)
        out[label] = accuracy(model, test[lang])
    al.set_active(model, ["langB", "task"])
    al.merge(model)
    controls["B: langB + task, merged"] = accuracy(model, test["B"])
    al.unmerge(model)
    controls["base restored bit for bit after unmerge"] = all(torch.equal(p, v) for p, v in theta)
    out["B: chance (majority class)"] = max(
        statistics.mean(float(label.float().mean()) for _, label in test["B"]),
        1 - statistics.mean(float(label.float().mean()) for _, label in test["B"]),
    )
    emb = "lm.model.embed_tokens"
    controls["task SFT: share of K in the embeddings"] = res.per_module.get(emb, 0) / res.k
    return {"accuracy": out, "controls": controls, "k": res.k, "maskable": res.maskable}


def run(s: Setup, log=print) -> dict[str, Any]:
    torch.set_num_threads(1)
    started, cpu = time.perf_counter(), time.process_time()
    runs = []
    for seed in s.seeds:
        runs.append(one_seed(s, seed))
        log(f"seed {seed}: {json.dumps(runs[-1])}  ({time.perf_counter() - started:.0f} s)")
    names = list(runs[0]["accuracy"])
    summary = {
        n: {
            "mean": statistics.mean(r["accuracy"][n] for r in runs),
            "std": statistics.pstdev(r["accuracy"][n] for r in runs),
            "per_seed": [r["accuracy"][n] for r in runs],
        }
        for n in names
    }
    return {
        "command": "python benchmarks/sft_transfer.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": 1,
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "setup": asdict(s),
        "k": runs[0]["k"],
        "maskable": runs[0]["maskable"],
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run in seconds; writes nothing")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    parser.add_argument("--set", nargs="*", default=[], help="override a Setup field: name=value (JSON)")
    args = parser.parse_args()
    s = Setup.tiny() if args.tiny else Setup()
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(s, key, tuple(json.loads(value)) if isinstance(getattr(s, key), tuple) else json.loads(value))
    if args.seeds:
        s.seeds = tuple(range(args.seeds))
    result = run(s)
    for name, row in result["summary"].items():
        print(f"{name:34s} {row['mean']:.3f} ± {row['std']:.3f}  {[round(x, 3) for x in row['per_seed']]}")
    if not args.tiny:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out} ({result['wall_s']} s wall, {result['cpu_s']} s CPU)")


if __name__ == "__main__":
    main()
