"""A LocFT-BF editing session: teach a small causal LM some facts, then change a handful of them.

    python examples/locft_edit.py            # about a minute on 2 CPU cores
    python examples/locft_edit.py --tiny     # seconds (CI)

1. A word-level tokenizer and a fact table are built in memory: every person lives in a city and
   has a job, each fact written with three templates ("anna lives in" / "the home of anna is" /
   "anna resides in" → "paris"; "anna works as" / … → "baker").
2. A small Llama is pre-trained from scratch on all the sentences until it completes every prompt
   correctly (no download, no pretrained weights).
3. `al.locft.edit` moves a handful of people to another city, breadth-first, by training one dense
   ΔW on `mlp.down_proj` of the last layer; `al.locft.evaluate` scores reliability (the edit
   prompt gives the new city), generalization (the two paraphrases do too) and locality (the
   person's job and other people's cities stay as before).
4. The edit is saved (`al.save`), checked against the saved base (`adapterlab validate`) and
   merged into a new checkpoint (`adapterlab merge`), which is loaded back and must decode as the
   edited model does.

The last line is the scores as JSON.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from _cli import adapterlab, report
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import adapterlab as al
from adapterlab.methods.locft import IGNORE, greedy, normalize

OUT = Path(tempfile.gettempdir()) / "adapterlab-examples" / "locft_edit"
PEOPLE = [
    "anna",
    "ben",
    "carla",
    "david",
    "elena",
    "felix",
    "greta",
    "hugo",
    "iris",
    "jonas",
    "karin",
    "leo",
    "maria",
    "nils",
    "olga",
    "paul",
    "rosa",
    "sven",
    "tina",
    "uwe",
    "vera",
    "walter",
    "xenia",
    "yusuf",
    "zoe",
    "arno",
    "bea",
    "cem",
    "dora",
    "emil",
    "fiona",
    "gabriel",
    "hanna",
    "ivan",
    "julia",
    "kurt",
    "lena",
    "max",
    "nora",
    "oskar",
]
CITIES = [
    "paris",
    "rome",
    "berlin",
    "madrid",
    "vienna",
    "oslo",
    "lisbon",
    "prague",
    "dublin",
    "athens",
    "warsaw",
    "zurich",
]
JOBS = ["baker", "pilot", "nurse", "farmer", "teacher", "lawyer", "painter", "plumber"]
CITY_TEMPLATES = ["{} lives in", "the home of {} is", "{} resides in"]
JOB_TEMPLATES = ["{} works as", "the job of {} is", "{} is employed as"]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model, few facts, few steps (CI)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="where everything is written (default: %(default)s)"
    )
    parser.add_argument("--edits", type=int, default=8, help="how many people move to another city")
    parser.add_argument("--layer", type=int, default=-1, help="the layer whose mlp.down_proj is edited")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--epochs", type=int, default=100, help="at most; stops when the edit loss is below 1e-2"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy shared machine)"
    )
    return parser.parse_args()


# -- data -----------------------------------------------------------------------------------------
def tokenizer() -> PreTrainedTokenizerFast:
    """One id per word of the templates, people, cities and jobs; [EOS] ends every sentence."""
    words = sorted({w for t in CITY_TEMPLATES + JOB_TEMPLATES for w in t.split() if w != "{}"})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *words, *PEOPLE, *CITIES, *JOBS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def fact_table(people: list[str], seed: int) -> dict[str, tuple[str, str]]:
    """{person: (city, job)}, drawn with `seed`."""
    rng = random.Random(seed)
    return {p: (rng.choice(CITIES), rng.choice(JOBS)) for p in people}


def sentences(facts: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """(prompt, answer) for every fact and template."""
    return [(t.format(p), city) for p, (city, _) in facts.items() for t in CITY_TEMPLATES] + [
        (t.format(p), job) for p, (_, job) in facts.items() for t in JOB_TEMPLATES
    ]


def lm_batch(tok: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """ "prompt answer [EOS]" rows, right-padded; labels are the tokens (-100 on padding)."""
    rows = [tok(f"{p} {a}")["input_ids"] + [tok.eos_token_id] for p, a in pairs]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


# -- pre-training ---------------------------------------------------------------------------------
def completed(model: torch.nn.Module, tok: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]) -> float:
    """Fraction of prompts whose greedy continuation is exactly the answer."""
    outs = greedy(model, tok, [p for p, _ in pairs], 2)
    return sum(normalize(o) == a for o, (_, a) in zip(outs, pairs, strict=True)) / len(pairs)


def pretrain(
    tok: PreTrainedTokenizerFast, corpus: list[tuple[str, str]], tiny: bool, seed: int
) -> LlamaForCausalLM:
    """A Llama trained from scratch on `corpus` (Adam, causal LM loss) until every prompt completes
    correctly (checked every 100 steps), or the step budget ends."""
    torch.manual_seed(seed)
    size = (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        if tiny
        else dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4)
    )
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            max_position_embeddings=16,
            num_key_value_heads=4,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
            **size,
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    max_steps, check_every = (20, 20) if tiny else (3000, 100)
    for step in range(1, max_steps + 1):
        model.train()
        batch = lm_batch(tok, rng.sample(corpus, min(32, len(corpus))))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0:
            model.eval()
            done = completed(model, tok, corpus)
            print(f"pre-training step {step}: loss {loss.item():.4f}, prompts completed correctly {done:.3f}")
            if done == 1.0:
                break
    return model.eval()


# -- editing --------------------------------------------------------------------------------------
def edit_requests(
    facts: dict[str, tuple[str, str]], edited: list[str], kept: list[str], seed: int
) -> list[dict]:
    """Each edited person moves to another city. Paraphrases: the other two city templates.
    Locality: the person's own job prompt, and one unedited person's city prompt."""
    rng = random.Random(seed + 1)
    reqs = []
    for person, other in zip(edited, kept, strict=False):  # one kept person per edit; the rest stay unpaired
        new = rng.choice([c for c in CITIES if c != facts[person][0]])
        reqs.append(
            {
                "prompt": CITY_TEMPLATES[0].format(person),
                "target": new,
                "paraphrases": [t.format(person) for t in CITY_TEMPLATES[1:]],
                "locality": [JOB_TEMPLATES[0].format(person), CITY_TEMPLATES[0].format(other)],
            }
        )
    return reqs


def merged_checkpoint(base: LlamaForCausalLM, edit_dir: Path, out: Path) -> LlamaForCausalLM:
    """Save the base as a Hugging Face checkpoint, validate the edit against it and merge it with
    the CLI; return the merged model loaded back."""
    base.save_pretrained(out / "base")
    adapterlab("validate", edit_dir, "--base", out / "base")
    adapterlab("merge", "--base", out / "base", "--adapter", edit_dir, "--out", out / "merged", "--overwrite")
    return LlamaForCausalLM.from_pretrained(out / "merged").eval()


def show_edits(model: torch.nn.Module, tok: PreTrainedTokenizerFast, reqs: list[dict]) -> None:
    """Print each edit prompt's greedy answer without and with the edit."""
    prompts = [r["prompt"] for r in reqs]
    with al.disabled(model):
        old = greedy(model, tok, prompts, 2)
    for prompt, was, now in zip(prompts, old, greedy(model, tok, prompts, 2), strict=True):
        print(f"  {prompt!r}: {was!r} -> {now!r}")


def unedited_facts(corpus: list[tuple[str, str]], reqs: list[dict]) -> list[tuple[str, str]]:
    """Every sentence of a fact no edit touches: all jobs, and the cities of the people not moved."""
    moved = {r["prompt"].split()[0] for r in reqs}
    return [(p, a) for p, a in corpus if a in JOBS or moved.isdisjoint(p.split())]


def agreement(
    merged: torch.nn.Module, model: torch.nn.Module, tok: PreTrainedTokenizerFast, prompts: list[str]
) -> tuple[float, float]:
    """(fraction of `prompts` with the same greedy output, largest logit difference) of two models."""
    same = sum(
        a == b for a, b in zip(greedy(merged, tok, prompts, 3), greedy(model, tok, prompts, 3), strict=True)
    )
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        gap = (merged(**enc).logits - model(**enc).logits).abs().max().item()
    return same / len(prompts), gap


def main() -> None:
    args = arguments()
    start = time.time()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tok = tokenizer()
    people = PEOPLE[:12] if args.tiny else PEOPLE
    n_edits = min(args.edits, 3 if args.tiny else args.edits, len(people) // 2)
    facts = fact_table(people, args.seed)
    corpus = sentences(facts)
    print(f"fact table: {len(people)} people, {len(corpus)} sentences")
    base = pretrain(tok, corpus, args.tiny, args.seed)
    order = random.Random(args.seed + 2).sample(people, len(people))
    reqs = edit_requests(facts, order[:n_edits], order[n_edits:], args.seed)
    before = al.locft.evaluate(base, tok, reqs)

    model = copy.deepcopy(base)
    edit = al.locft.edit(
        model,
        tok,
        reqs,
        layer=args.layer,
        module="mlp.down_proj",
        lr=args.lr,
        batch_size=len(reqs),
        epochs=2 if args.tiny else args.epochs,
        seed=args.seed,
    )
    after = al.locft.evaluate(model, tok, reqs)
    print(
        f"edited {al.adapters(model)['locft'].targets[0]}: {edit.steps} steps, {edit.epochs} epochs, "
        f"final loss {edit.final_loss:.4f}, {edit.seconds:.1f} s"
    )
    show_edits(model, tok, reqs)
    unedited = unedited_facts(corpus, reqs)
    unedited_before, unedited_after = completed(base, tok, unedited), completed(model, tok, unedited)

    edit_dir = al.save(model, args.out / "edit", name="locft")
    merged = merged_checkpoint(base, edit_dir, args.out)
    probe = [p for r in reqs for p in [r["prompt"], *r["paraphrases"], *r["locality"]]]
    same, gap = agreement(merged, model, tok, probe)

    print(f"before editing: {before}\nafter editing:  {after}")
    print(f"other facts still completed: {unedited_before:.3f} -> {unedited_after:.3f}")
    report(
        {
            "example": "locft_edit",
            "tiny": args.tiny,
            "edits": len(reqs),
            "layer": args.layer,
            "before": {k: before[k] for k in ("reliability", "generalization", "locality")},
            "after": {k: after[k] for k in ("reliability", "generalization", "locality")},
            "unedited_facts_before": unedited_before,
            "unedited_facts_after": unedited_after,
            "edit_steps": edit.steps,
            "edit_final_loss": edit.final_loss,
            "merged_same_output": same,
            "merged_max_logit_diff": gap,
            "merged_dir": str(args.out / "merged"),
            "seconds": round(time.time() - start, 1),
        }
    )


if __name__ == "__main__":
    main()
