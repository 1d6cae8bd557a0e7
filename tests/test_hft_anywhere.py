"""HFT on any transformer: categories derived from the module tree (T5, ViT, CLIP, Whisper), the
built-in maps as overrides that agree with the derivation, T5LayerNorm as an RMS norm, describe."""

import pytest
import torch
from families import build

import adapterlab as al
from adapterlab.methods.dense import DenseDelta, dense_kind
from adapterlab.methods.hft import ARCHITECTURES, select_half
from adapterlab.methods.hft_map import derived_groups, layer_groups

pytestmark = pytest.mark.usefixtures("single_thread")

QKVO = ["q_proj", "k_proj", "v_proj", "out_proj"]
EXPECTED = {
    "t5": {
        "encoder.block": {
            "attention": [f"layer.0.SelfAttention.{m}" for m in "qkvo"],
            "ffn": ["layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"],
            "norm": ["layer.0.layer_norm", "layer.1.layer_norm"],
        },
        "decoder.block": {
            "attention": [f"layer.0.SelfAttention.{m}" for m in "qkvo"],
            "cross_attention": [f"layer.1.EncDecAttention.{m}" for m in "qkvo"],
            "ffn": ["layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wo"],
            "norm": ["layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm"],
        },
    },
    "whisper": {
        "model.encoder.layers": {
            "attention": [f"self_attn.{m}" for m in QKVO],
            "ffn": ["fc1", "fc2"],
            "norm": ["self_attn_layer_norm", "final_layer_norm"],
        },
        "model.decoder.layers": {
            "attention": [f"self_attn.{m}" for m in QKVO],
            "cross_attention": [f"encoder_attn.{m}" for m in QKVO],
            "ffn": ["fc1", "fc2"],
            "norm": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
        },
    },
    "clip": {
        stack: {
            "attention": [f"self_attn.{m}" for m in QKVO],
            "ffn": ["mlp.fc1", "mlp.fc2"],
            "norm": ["layer_norm1", "layer_norm2"],
        }
        for stack in ("text_model.encoder.layers", "vision_model.encoder.layers")
    },
}


def as_sets(cats: dict) -> dict:
    return {stack: {c: sorted(ps) for c, ps in cs.items()} for stack, cs in cats.items()}


@pytest.mark.parametrize("family", ["t5", "whisper", "clip"])
def test_derived_categories(family):
    assert as_sets(al.hft.category_map(build(family).model)) == as_sets(EXPECTED[family])


def test_derived_categories_of_vit():
    cats = al.hft.category_map(build("vit").model)
    assert len(cats) == 1  # one encoder stack
    found = next(iter(cats.values()))
    assert len(found["attention"]) == 4 and len(found["ffn"]) == 2 and len(found["norm"]) == 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_the_built_in_maps_agree_with_the_derivation(family):
    model = build(family).model
    builtin = layer_groups(model, ARCHITECTURES[model.config.model_type])
    derived = derived_groups(model)
    assert [(layer, as_sets({"": c})) for layer, c in derived] == [
        (layer, as_sets({"": c})) for layer, c in builtin
    ]


@pytest.mark.parametrize("family", ["t5", "vit", "clip", "whisper"])
@pytest.mark.parametrize("seed", [0, 3])
def test_half_rule_on_derived_categories(family, seed):
    model = build(family).model
    chosen = set(select_half(model, seed))
    heavy_layers = {}
    for layer, cats in derived_groups(model):
        for cat, members in cats.items():
            trained = sum(p in chosen for p in members)
            n = len(members)
            assert trained in (n // 2, n - n // 2), (layer, cat)
            if n % 2:  # odd: ⌊n/2⌋ train in a random half of the stack's layers, ⌈n/2⌉ in the others
                heavy_layers.setdefault((layer.rpartition(".")[0], cat), []).append(trained == n // 2)
    for flags in heavy_layers.values():
        assert sum(flags) == len(flags) // 2 or sum(flags) == len(flags) - len(flags) // 2
    al.inject(model, "hft", seed=seed)
    assert al.adapters(model)["default"].targets == select_half(model, seed)


def test_t5_layer_norm_is_an_rms_norm_and_user_categories_work_on_t5():
    model = build("t5").model
    norm = model.encoder.block[0].layer[0].layer_norm
    assert type(norm).__name__ == "T5LayerNorm" and dense_kind(norm) == "rms_norm"
    delta = DenseDelta(al.HFTConfig(), norm)
    with torch.no_grad():
        delta.weight_delta.normal_()
        x = torch.randn(2, 3, 32)
        folded = torch.func.functional_call(norm, {"weight": norm.weight + delta.weight_delta}, (x,))
        assert torch.allclose(delta(x, norm(x)), folded, atol=1e-6)
    self_attention_and_norms = {
        "attention": [f"layer.0.SelfAttention.{m}" for m in "qkvo"],
        "norm": ["layer.0.layer_norm", "layer.1.layer_norm"],
    }
    al.inject(model, "hft", categories=self_attention_and_norms)  # was refused: T5LayerNorm
    chosen = al.adapters(model)["default"].targets
    assert len(chosen) == 4 * (2 + 1)  # encoder and decoder blocks both hold these paths
    assert sum(p.endswith("layer_norm") for p in chosen) == 4


def test_describe_shows_the_chosen_half():
    model = build("whisper").model
    text = al.hft.describe(model, seed=2)
    chosen = select_half(model, 2)
    lines = text.splitlines()
    assert lines[0] == f"hft seed=2: {len(chosen)} of 42 modules train, in 4 layers (derived categories)"
    assert "model.decoder.layers.1" in lines
    cross = next(line for line in lines[lines.index("model.decoder.layers.0") :] if "cross_attention" in line)
    assert cross.startswith("  cross_attention 2/4: ")
    for word in cross.split(": ")[1].split(" "):
        path = f"model.decoder.layers.0.{word[1:]}"
        assert (word[0] == "+") == (path in chosen), word
    assert "(built-in map)" in al.hft.describe(build("gpt2").model).splitlines()[0]
