"""PEFT's LoRA variants both ways, with equal outputs: DoRA (Linear, Conv1D, Conv2d, Embedding),
LoRA on nn.Embedding, rank_pattern / alpha_pattern; merge → unmerge exact; what we refuse, by name."""

import json
import warnings

import pytest
import torch
from conftest import conv_net, tiny_gpt2, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import adapterlab as al

peft = pytest.importorskip("peft")

TOL = 1e-5
LLAMA_IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
CASES = {  # name: (build, peft target_modules, our targets, input)
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], ["q_proj", "v_proj", "down_proj"], LLAMA_IDS),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], ["c_attn", "c_fc"], LLAMA_IDS),
    "conv2d": (
        conv_net,
        ["conv1", "conv2"],
        ["conv1", "conv2"],
        torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)),
    ),
    "embedding": (tiny_llama, ["embed_tokens", "q_proj"], ["embed_tokens", "q_proj"], LLAMA_IDS),
}


def outputs(model, x):
    with torch.no_grad():
        return model(x) if x.is_floating_point() else model(input_ids=x).logits


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Every LoRA tensor random (B and embedding A start at zero), DoRA magnitudes moved off ‖W‖."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                p.copy_(noise * 0.1)


def peft_save(build, cfg, path):
    theirs = peft.get_peft_model(build(), cfg)
    randomize(theirs)
    theirs.eval()
    theirs.save_pretrained(path)
    return theirs


def peft_load(build, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(build(), path)
    complaints = [str(w.message) for w in caught if "peft" in w.filename or "Unexpected" in str(w.message)]
    assert not complaints, complaints  # peft must not complain about our adapter_config.json
    return theirs.eval()


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def check_merge_roundtrip(ours, theirs, x):
    """Merged: equal to PEFT's outputs; unmerged: every base weight back, bit for bit with DoRA (merge
    keeps W) and to 1e-6 without (unmerge subtracts ΔW in fp32, as for every LoRA)."""
    before = base_weights(ours)
    al.merge(ours)
    assert (outputs(theirs, x) - outputs(ours, x)).abs().max().item() <= TOL
    al.unmerge(ours)
    after = base_weights(ours)
    tol = 0.0 if al.adapters(ours)["default"].use_dora else 1e-6
    assert max((before[n] - after[n]).abs().max().item() for n in before) <= tol


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_loads_in_ours(tmp_path, case):
    build, peft_targets, _, x = CASES[case]
    theirs = peft_save(
        build, peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets, use_dora=True), tmp_path
    )
    ours = al.load(build(), tmp_path)
    assert al.adapters(ours)["default"].use_dora
    assert (outputs(theirs, x) - outputs(ours, x)).abs().max().item() <= TOL
    assert (outputs(ours, x) - outputs(build(), x)).abs().max().item() > 1e-3  # the adapter does something
    check_merge_roundtrip(ours, theirs, x)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dora", [False, True])
def test_our_variants_load_in_peft(tmp_path, case, dora):
    build, _, targets, x = CASES[case]
    ours = al.inject(build(), "lora", r=4, alpha=8, targets=targets, use_dora=dora, dropout=0.1)
    randomize(ours)
    ours.eval()
    al.save(ours, tmp_path)
    theirs = peft_load(build, tmp_path)
    n_theirs = sum(1 for n, _ in theirs.named_parameters() if "lora_" in n)
    assert n_theirs == sum(1 for n, _ in ours.named_parameters() if "lora_" in n)
    assert (outputs(theirs, x) - outputs(ours, x)).abs().max().item() <= TOL
    assert (outputs(ours, x) - outputs(build(), x)).abs().max().item() > 1e-3


def test_peft_embedding_lora_loads_in_ours(tmp_path):
    build, peft_targets, _, x = CASES["embedding"]
    theirs = peft_save(build, peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets), tmp_path)
    ours = al.load(build(), tmp_path)
    kinds = {type(d).__name__ for _, _, d in al.model.deltas(ours, "default")}
    assert kinds == {"EmbeddingLoRA", "LinearLoRA"}
    assert (outputs(theirs, x) - outputs(ours, x)).abs().max().item() <= TOL
    check_merge_roundtrip(ours, theirs, x)


def test_peft_embedding_base_weight_must_equal_the_models(tmp_path):
    """PEFT saves the embedding's base weight beside its factors; another one is refused by name."""
    build, peft_targets, _, _ = CASES["embedding"]
    peft_save(build, peft.LoraConfig(r=4, target_modules=peft_targets), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors
    tensors[key] = tensors[key] + 1
    save_file(tensors, file)
    with pytest.raises(al.AdapterFileError, match="embed_tokens.*base weight|base weight.*embed_tokens"):
        al.load(build(), tmp_path)


def test_all_linear_does_not_take_embeddings(llama):
    al.inject(llama, "lora", targets="all-linear")
    adapted = [p for p, _, _ in al.model.deltas(llama, "default")]
    assert adapted and not any("embed" in p for p in adapted)


PATTERNS = {
    "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6},
    "alpha_pattern": {"v_proj": 3.0, r"layers\.0\.self_attn\.q_proj": 5.0},
}


def test_peft_patterns_load_in_ours(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **PATTERNS)
    theirs = peft_save(tiny_llama, cfg, tmp_path)
    ours = al.load(tiny_llama(), tmp_path)
    config = al.adapters(ours)["default"]
    assert config.rank_pattern == PATTERNS["rank_pattern"]
    ranks = {p: d.lora_A.weight.shape[0] for p, _, d in al.model.deltas(ours, "default")}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.self_attn.v_proj"] == 6
    assert (outputs(theirs, LLAMA_IDS) - outputs(ours, LLAMA_IDS)).abs().max().item() <= TOL
    check_merge_roundtrip(ours, theirs, LLAMA_IDS)


@pytest.mark.parametrize("dora", [False, True])
def test_our_patterns_load_in_peft(tmp_path, dora):
    ours = al.inject(
        tiny_llama(), "lora", r=4, alpha=8, targets=["q_proj", "v_proj"], use_dora=dora, **PATTERNS
    )
    scalings = {p: d.scaling for p, _, d in al.model.deltas(ours, "default")}
    assert (
        scalings["model.layers.0.self_attn.q_proj"] == 5.0 / 2
        and scalings["model.layers.1.self_attn.v_proj"] == 3.0 / 6
    )
    randomize(ours)
    al.save(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] == PATTERNS["rank_pattern"] and written["use_dora"] is dora
    theirs = peft_load(tiny_llama, tmp_path)
    assert (outputs(theirs, LLAMA_IDS) - outputs(ours, LLAMA_IDS)).abs().max().item() <= TOL
    again = al.load(tiny_llama(), tmp_path)  # and back: the same adapter
    assert (outputs(again, LLAMA_IDS) - outputs(ours, LLAMA_IDS)).abs().max().item() == 0


def test_dora_gradients_match_peft(tmp_path):
    """The norm is a constant in backward, as PEFT's: equal gradients for A, B and the magnitude."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    theirs = peft_save(tiny_llama, cfg, tmp_path)
    ours = al.load(tiny_llama(), tmp_path, trainable=True)
    for model in (theirs, ours):
        model(input_ids=LLAMA_IDS).logits.square().mean().backward()

    def grads(model):
        found = {}
        for n, p in model.named_parameters():
            if p.grad is not None:
                leaf = "m" if "magnitude" in n else n.split("lora_")[1][0]
                found[(n.split(".q_proj")[0].split("layers.")[1], leaf)] = p.grad
        return found

    mine, peft_grads = grads(ours), grads(theirs)
    assert set(mine) == set(peft_grads) and len(mine) == 6
    for k in mine:
        assert torch.allclose(mine[k], peft_grads[k].reshape(mine[k].shape), atol=1e-6, rtol=1e-4), k


@given(seed=st.integers(0, 2**16), half=st.booleans(), weight=st.sampled_from([1.0, 0.5, -1.0]))
def test_dora_merge_unmerge_is_exact(seed, half, weight):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.Embedding(6, 5), nn.Conv2d(3, 4, 3))
    if half:
        model = model.to(torch.bfloat16)
    al.inject(model, "lora", r=2, targets=["0", "1", "2"], use_dora=True)
    randomize(model, seed)
    al.set_active(model, {"default": weight})
    before = base_weights(model)
    x, ids, img = torch.randn(3, 7), torch.randint(0, 6, (4,)), torch.randn(1, 3, 5, 5)
    if half:
        x, img = x.to(torch.bfloat16), img.to(torch.bfloat16)
    want = [model[0](x), model[1](ids), model[2](img)]
    al.merge(model)
    got = [model[0](x), model[1](ids), model[2](img)]
    tol = 0.05 if half else 1e-5
    for w, g in zip(want, got, strict=True):
        assert (w.float() - g.float()).abs().max().item() <= tol * max(1.0, w.float().abs().max().item())
    al.unmerge(model)
    after = base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def seq_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(cfg).eval()


SAVED = {  # name: (build, LoRA targets, modules_to_save)
    "lm_head+embed": (tiny_llama, ["q_proj"], ["lm_head", "embed_tokens"]),
    "score": (seq_classifier, ["q_proj", "v_proj"], ["score"]),
}


def perturb_saved(model, names):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(
                f"{m}.modules_to_save" in n or n.endswith("deltas.default.weight") and m in n for m in names
            ):
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1)


@pytest.mark.parametrize("case", sorted(SAVED))
def test_peft_modules_to_save_load_in_ours(tmp_path, case):
    build, targets, saved = SAVED[case]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=targets, modules_to_save=saved))
    randomize(theirs)
    perturb_saved(theirs, saved)
    theirs.eval().save_pretrained(tmp_path)
    ours = al.load(build(), tmp_path)
    kinds = {p.rsplit(".", 1)[-1]: type(d).__name__ for p, _, d in al.model.deltas(ours, "default")}
    assert all(kinds[m] == "SavedModule" for m in saved)
    assert (outputs(theirs, LLAMA_IDS) - outputs(ours, LLAMA_IDS)).abs().max().item() <= TOL
    check_merge_roundtrip(ours, theirs, LLAMA_IDS)


@pytest.mark.parametrize("case", sorted(SAVED))
def test_our_modules_to_save_load_in_peft(tmp_path, case):
    build, targets, saved = SAVED[case]
    ours = al.inject(build(), "lora", r=4, targets=targets, modules_to_save=saved)
    assert al.adapters(ours)["default"].modules_to_save == [
        p for p, _, d in al.model.deltas(ours, "default") if type(d).__name__ == "SavedModule"
    ]
    randomize(ours)
    perturb_saved(ours, saved)
    al.save(ours, tmp_path)
    theirs = peft_load(build, tmp_path)
    assert (outputs(theirs, LLAMA_IDS) - outputs(ours, LLAMA_IDS)).abs().max().item() <= TOL
    assert (outputs(ours, LLAMA_IDS) - outputs(build(), LLAMA_IDS)).abs().max().item() > 1e-3


def test_a_saved_module_with_a_trained_bias_is_not_merged():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    al.inject(model, "lora", r=2, targets=["0"], modules_to_save=["1"])
    saved = model[1].deltas["default"]
    with torch.no_grad():
        saved.bias.add_(1.0)
    with pytest.raises(al.MergeError, match="cannot be merged"):
        al.merge(model)
    with torch.no_grad():
        saved.bias.sub_(1.0)
        saved.weight.add_(0.5)
    x = torch.randn(3, 4)
    want = model(x)
    al.merge(model)
    assert (model(x) - want).abs().max().item() <= 1e-5


def test_a_module_both_adapted_and_saved_is_refused(llama):
    with pytest.raises(al.ConfigError, match="both LoRA targets and modules_to_save"):
        al.inject(llama, "lora", targets=["q_proj", "lm_head"], modules_to_save=["lm_head"])


# -- refusals, by name ------------------------------------------------------------------------------
def test_a_pattern_that_names_no_module_is_refused(llama):
    with pytest.raises(al.TargetError, match="rank_pattern key 'k_proj'"):
        al.inject(llama, "lora", targets=["q_proj"], rank_pattern={"k_proj": 2})
    assert not al.adapters(llama)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]"),
        ({"alpha_pattern": {"q_proj": -1.0}}, r"alpha_pattern\['q_proj'\]"),
        ({"rank_pattern": {"(": 2}}, "rank_pattern key"),
        ({"use_dora": "yes"}, "use_dora"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(al.ConfigError, match=match):
        al.inject(tiny_llama(), "lora", targets=["q_proj"], **options)


def test_embedding_with_max_norm_is_refused():
    model = nn.Sequential(nn.Embedding(5, 4, max_norm=1.0))
    with pytest.raises(al.UnsupportedModuleError, match="max_norm"):
        al.inject(model, "lora", targets=["0"])


@pytest.mark.parametrize(
    "options, name",
    [
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias"),
        ({"layer_replication": [[0, 1], [0, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_peft_features_we_do_not_read_are_refused_by_name(tmp_path, options, name):
    peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], **options)
    ).save_pretrained(tmp_path)
    with pytest.raises(al.AdapterFileError, match=name):
        al.load(tiny_llama(), tmp_path)


def test_dora_on_a_file_without_magnitudes_is_refused(tmp_path):
    """use_dora in the config but no magnitude vector in the file: a module-named shape error."""
    peft_save(tiny_llama, peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(al.AdapterFileError, match=r"q_proj.*lora_magnitude_vector"):
        al.load(tiny_llama(), tmp_path)


def test_cli_merges_dora_and_embedding_adapters_and_refuses_a_dense_export(tmp_path, capsys):
    """Without the model: `merge` uses the checkpoint's weights (DoRA's ΔW needs them) and gives
    al.load's outputs; `export --format dense` has no base weight and refuses DoRA by name."""
    from transformers import LlamaForCausalLM

    from adapterlab.cli import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    al.inject(model, "lora", r=4, targets=["q_proj", "embed_tokens"], use_dora=True)
    randomize(model)
    al.save(model, tmp_path / "dora")
    assert main(["validate", str(tmp_path / "dora"), "--base", str(tmp_path / "base")]) == 0
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(tmp_path / "dora"),
                "--base",
                str(tmp_path / "base"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (outputs(merged, LLAMA_IDS) - outputs(model, LLAMA_IDS)).abs().max().item() <= TOL
    assert (
        main(
            ["export", str(tmp_path / "dora"), "--format", "dense", "--out", str(tmp_path / "d.safetensors")]
        )
        == 1
    )
    assert "ΔW of DoRA depends on the base weight" in capsys.readouterr().err


def test_a_peft_conv_lora_we_cannot_reproduce_is_refused(tmp_path):
    """PEFT's lora_A ignores the base conv's padding mode: its outputs are not ours, so no load."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")).eval()

    peft_save(build, peft.LoraConfig(r=2, target_modules=["0"]), tmp_path)
    with pytest.raises(al.AdapterFileError, match=r"\['0'\].*padding mode"):
        al.load(build(), tmp_path)
