"""LocFT-BF: the edit location, what trains, the breadth-/depth-first trainers, evaluation, save/load."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import adapterlab as al
from adapterlab.methods.locft import edit_location, greedy, normalize

pytestmark = pytest.mark.usefixtures("single_thread")

PEOPLE, CITIES, JOBS = 12, 12, 6


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no download): one id per word."""
    words = [
        "[PAD]",
        "[EOS]",
        "[UNK]",
        "lives",
        "in",
        "the",
        "home",
        "of",
        "is",
        "works",
        "as",
        "a",
        "person",
        "city",
        "job",
        *(f"p{i}" for i in range(PEOPLE)),
        *(f"c{i}" for i in range(CITIES)),
        *(f"j{i}" for i in range(JOBS)),
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def tiny_lm(tokenizer, seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    """A random Llama; initializer_range 0.3 gives activations of a trained model's scale, so a few
    steps can edit it (at the default 0.02 the edited module barely reaches the output)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(cfg).eval()


def requests(n: int = 6):
    return [
        {
            "prompt": f"p{i} lives in",
            "target": f"c{(i * 5) % CITIES}",
            "paraphrases": [f"the home of p{i} is"],
            "locality": [f"p{i} works as a"],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def test_only_the_configured_module_changes(tok):
    model = tiny_lm(tok)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = al.locft.edit(model, tok, requests(), layer=1, lr=5e-2, batch_size=3, epochs=3)
    assert report.steps > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.1.mlp.down_proj.deltas.locft.weight_delta"]
    assert al.adapters(model)["locft"].targets == ["model.layers.1.mlp.down_proj"]
    al.merge(model)
    changed = {
        n.replace(".base_layer", "")
        for n, p in model.named_parameters()
        if "deltas" not in n and not torch.equal(p, original[n.replace(".base_layer", "")])
    }
    assert changed == {"model.layers.1.mlp.down_proj.weight"}


def test_breadth_first_learns_the_edits_then_skips_and_stops(tok):
    model = tiny_lm(tok)
    reqs = requests()
    before = al.locft.evaluate(model, tok, reqs)
    assert before["reliability"] == 0.0 and before["locality"] == 1.0
    report = al.locft.edit(model, tok, reqs, layer=-1, lr=1e-1, batch_size=4, epochs=60, loss_threshold=0.1)
    assert report.losses[-1] < 0.1 and report.epochs < 60  # stopped on the epoch mean
    assert report.losses[0] > report.losses[-1]
    after = al.locft.evaluate(model, tok, reqs)
    assert after["reliability"] == 1.0
    assert after["edits"] == 6 and after["paraphrases"] == 6 and after["locality_prompts"] == 6
    # every batch below the threshold: nothing trains, and the first epoch's mean stops the run
    again = al.locft.edit(model, tok, reqs, lr=1e-1, batch_size=4, epochs=60, loss_threshold=0.5)
    assert (again.steps, again.epochs, again.skipped) == (0, 1, 2)


def test_depth_first_trains_one_edit_at_a_time(tok):
    model = tiny_lm(tok)
    reqs = requests(3)
    report = al.locft.edit(
        model, tok, reqs, layer=0, strategy="depth_first", lr=1e-1, epochs=40, loss_threshold=0.1
    )
    assert report.strategy == "depth_first" and report.epochs == 1
    assert len(report.losses) == 3 and all(loss < 0.1 for loss in report.losses)  # each to convergence
    assert 3 <= report.steps + report.skipped - 3 <= 3 * 40 and report.skipped == 3


def test_save_load_reproduces_outputs(tok, tmp_path):
    model = tiny_lm(tok)
    al.locft.edit(model, tok, requests(), layer=2, lr=5e-2, batch_size=6, epochs=5)
    ids = tok(["p1 lives in c3", "the home of p2 is"], padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = model(ids).logits
    al.save(model, tmp_path / "edit", name="locft")
    fresh = al.load(tiny_lm(tok), tmp_path / "edit", name="locft")
    assert al.adapters(fresh)["locft"].layer == 2
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, tuned)


def test_evaluate_normalises_and_compares_with_the_unedited_model(tok):
    assert normalize("  Paris.\n") == "paris" and normalize("New   York!") == "new york"
    model = tiny_lm(tok)
    outs = greedy(model, tok, ["p1 lives in", "the home of p2 is", "p3 lives in"], 3)
    assert len(outs) == 3 and all(len(o.split()) <= 3 for o in outs)
    assert outs[0] == greedy(model, tok, ["p1 lives in"], 3)[0]  # batching never changes a result
    target = outs[0] or "c1"
    scores = al.locft.evaluate(model, tok, [{"prompt": "p1 lives in", "target": target}])
    assert scores["generalization"] is None and scores["locality"] is None


def test_bad_input_names_the_fix(tok):
    model = tiny_lm(tok)
    with pytest.raises(al.ConfigError, match=r"layer=7 is out of range; 'model.layers' has 3 layers \(0..2"):
        al.inject(model, "locft", layer=7)
    with pytest.raises(al.TargetError, match="closest: 'mlp.down_proj'.*modules inside a layer"):
        al.inject(model, "locft", layer=0, module="mlp.dwn_proj")
    with pytest.raises(al.ConfigError, match="pass layer="):
        al.inject(model, "locft")
    with pytest.raises(al.ConfigError, match="request 1 has target=None"):
        al.locft.edit(
            model, tok, [{"prompt": "p1 lives in", "target": "c1"}, {"prompt": "p2 lives in"}], layer=0
        )
    with pytest.raises(al.ConfigError, match="non-empty prompt"):
        al.locft.edit(model, tok, [{"prompt": "p1 lives in", "target": "  "}], layer=0)
    with pytest.raises(al.ConfigError, match="strategy="):
        al.locft.edit(model, tok, requests(1), layer=0, strategy="random")
    with pytest.raises(al.ConfigError, match="no edit requests"):
        al.locft.edit(model, tok, [], layer=0)
    assert al.adapters(model) == {}
    al.locft.edit(model, tok, requests(1), layer=0, epochs=1)
    with pytest.raises(al.ConfigError, match="edits 'model.layers.0.mlp.down_proj', not layer=1"):
        al.locft.edit(model, tok, requests(1), layer=1)
    assert edit_location(model, -1, "self_attn.o_proj") == "model.layers.2.self_attn.o_proj"


def test_loss_averages_over_each_target_then_over_the_batch(tok):
    """The official code averages the cross-entropy over each example's target tokens, then over the
    examples; a token-level mean would weigh the 5-token target 2.5 times the 2-token one."""
    model = tiny_lm(tok)
    reqs = [
        {"prompt": "p1 lives in", "target": "c3"},
        {"prompt": "the home of p2 is", "target": "c4 c5 c6 c7"},
    ]
    per_example, tokens = [], []
    with torch.no_grad():
        for r in reqs:
            prompt = tok(r["prompt"])["input_ids"]
            target = tok(" " + r["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([prompt + target])).logits[0]
            start = len(prompt) - 1  # the logits at position t predict token t + 1
            ce = torch.nn.functional.cross_entropy(logits[start : start + len(target)], torch.tensor(target))
            per_example.append(ce.item())
            tokens.append(len(target))
    sample_mean = sum(per_example) / 2
    token_mean = sum(c * n for c, n in zip(per_example, tokens, strict=True)) / sum(tokens)
    assert tokens == [2, 5] and abs(sample_mean - token_mean) > 1e-2  # the two averages differ here
    # a threshold above every loss: every batch is skipped, so the model is unchanged
    report = al.locft.edit(model, tok, reqs, layer=0, batch_size=2, epochs=1, loss_threshold=1e9)
    assert report.steps == 0
    assert report.final_loss == pytest.approx(sample_mean, rel=1e-5)
    assert report.losses[0] == pytest.approx(sample_mean, rel=1e-5)
