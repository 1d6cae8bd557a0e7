"""One matching rule: names (exact or dotted suffix), regex (full match), keywords, exclude, layers."""

import pytest
from conftest import tiny_gpt2
from torch import nn

import adapterlab as al
from adapterlab.config import config_for
from adapterlab.targeting import find_targets, layer_index


def paths(model, **kw):
    return [p for p, _ in find_targets(model, config_for("lora", **kw))]


def test_names_match_exactly_or_as_dotted_suffix(llama):
    assert paths(llama, targets=["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert paths(llama, targets=["1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert paths(llama, targets=["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj"]


def test_suffix_is_per_dotted_component(llama):
    with pytest.raises(al.TargetError, match="'proj'"):
        paths(llama, targets=["proj"])  # 'q_proj' does not end with '.proj'


def test_regex_is_a_full_match(llama):
    assert paths(llama, targets=r".*\.(q|v)_proj") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(al.TargetError):
        paths(llama, targets=r"q_proj")  # no full match


def test_all_linear_exclude_and_layers(llama):
    every = paths(llama)
    assert len(every) == 14 and "lm_head" not in every
    no_mlp = paths(llama, exclude=r".*\.mlp\..*")
    assert len(no_mlp) == 8 and not any(".mlp." in p for p in no_mlp)
    assert paths(llama, exclude=["down_proj", "up_proj"], layers=[1]) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj",
    ]


def test_all_linear_on_gpt2_finds_conv1d():
    assert len(paths(tiny_gpt2())) == 2 * 4


def test_all_conv_and_all():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(3, 3), nn.ConvTranspose2d(3, 3, 1))
    assert paths(model, targets="all-conv") == ["0"]
    assert paths(model, targets="all") == ["0", "1"]


def test_same_rule_after_wrapping(llama):
    al.inject(llama, "lora", name="a", targets=["q_proj"])
    assert paths(llama, targets=["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert not any("base_layer" in p or "deltas" in p for p in paths(llama, targets=".*proj"))


def test_layer_index():
    assert layer_index("model.layers.12.mlp") == 12
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None
