"""Config registry and JSON round-trip."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import adapterlab as al
from adapterlab.config import AdapterConfig, config_class, methods


def test_registry_knows_lora_and_convlora():
    assert {"lora", "convlora"} <= set(methods())
    assert config_class("LoRA") is al.LoRAConfig
    assert isinstance(al.config_for("convlora"), al.ConvLoRAConfig)


names = st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), min_size=1, max_size=4)


@given(
    r=st.integers(1, 512),
    alpha=st.floats(0.01, 1e3),
    dropout=st.floats(0, 0.9),
    rslora=st.booleans(),
    mode=st.sampled_from(["kernel", "reshape"]),
    targets=st.one_of(names, st.sampled_from(["all-linear", "all-conv", r".*\.q_proj"])),
    exclude=st.one_of(st.none(), names),
    layers=st.one_of(st.none(), st.lists(st.integers(0, 40), min_size=1)),
    method=st.sampled_from(["lora", "convlora"]),
)
def test_json_round_trip(r, alpha, dropout, rslora, mode, targets, exclude, layers, method):
    cfg = al.config_for(
        method,
        r=r,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
        conv_mode=mode,
        targets=targets,
        exclude=exclude,
        layers=layers,
    )
    back = AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and type(back) is type(cfg)


@pytest.mark.parametrize(
    "data",
    [
        {"method": "lora", "r": "8"},
        {"method": "lora", "r": 8.5},
        {"method": "lora", "rslora": "yes"},
        {"method": "lora", "targets": 3},
        {"method": "lora", "targets": []},
        {"method": "lora", "wat": 1},
        {"r": 8},
        ["lora"],
    ],
)
def test_from_dict_rejects_bad_fields(data):
    with pytest.raises(al.ConfigError):
        AdapterConfig.from_dict(data)


def test_each_method_declares_the_settings_inspect_shows():
    """`adapterlab inspect` prints `config.settings()`: the fields each config class declares."""
    expected = {
        "lora": ("r", "alpha", "rslora", "conv_mode", "dropout"),
        "convlora": ("r", "alpha", "rslora", "conv_mode", "dropout"),
        "dense": (),
        "hft": ("seed",),
        "locft": ("layer", "module"),
        "levi": (),
        "sft": ("density", "count", "full_steps"),
        "sara": ("density", "threshold", "progressive_step"),
    }
    assert {m: config_class(m).summary_fields for m in methods()} == expected
    assert al.config_for("sft", density=0.02).settings() == {
        "density": 0.02,
        "count": None,
        "full_steps": None,
    }
