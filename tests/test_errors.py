"""Bad input: each case raises an AdapterlabError subclass whose message names the bad value and the fix."""

import json
import re

import pytest
import torch
from conftest import read_weights, tiny_llama
from torch import nn

import adapterlab as al
from adapterlab.io import WEIGHTS_FILE


def lin():
    return nn.Sequential(nn.Linear(4, 4), nn.Embedding(3, 4))


def merged_twice():
    m = al.inject(lin(), "lora", targets=["0"])
    al.merge(m)
    al.merge(m)


def pickle_dir(tmp):
    torch.save({}, tmp / "adapter_model.bin")
    al.load(lin(), tmp)


def newer(tmp):
    m = al.inject(lin(), "lora", targets=["0"])
    al.save(m, tmp)
    from safetensors.torch import save_file

    t, meta = read_weights(tmp / WEIGHTS_FILE)
    block = json.loads(meta["adapterlab"])
    block["format_version"] = 7
    save_file(t, tmp / WEIGHTS_FILE, metadata={"adapterlab": json.dumps(block)})
    al.load(lin(), tmp)


def shape_mismatch(tmp):
    al.save(al.inject(nn.Sequential(nn.Linear(4, 4)), "lora", targets=["0"]), tmp)
    al.load(nn.Sequential(nn.Linear(5, 4)), tmp)


def corrupted(tmp):
    al.save(al.inject(lin(), "lora", targets=["0"]), tmp)
    (tmp / WEIGHTS_FILE).write_bytes(b"\x00" * 20)
    al.load(lin(), tmp)


def missing_file(tmp):
    al.save(al.inject(lin(), "lora", targets=["0"]), tmp)
    (tmp / WEIGHTS_FILE).unlink()
    al.load(lin(), tmp)


def duplicate():
    m = al.inject(lin(), "lora", targets=["0"])
    al.inject(m, "lora", targets=["0"])


def set_active_unknown():
    al.set_active(al.inject(lin(), "lora", targets=["0"]), ["nope"])


def delete_merged():
    m = al.inject(lin(), "lora", targets=["0"])
    al.merge(m)
    al.delete(m, "default")


CASES = [
    (
        "rank zero",
        lambda t: al.inject(lin(), "lora", r=0, targets=["0"]),
        al.ConfigError,
        r"r=0",
        r"use a rank",
    ),
    (
        "negative alpha",
        lambda t: al.inject(lin(), "lora", alpha=-1, targets=["0"]),
        al.ConfigError,
        r"alpha=-1",
        r"alpha = 2\*r",
    ),
    (
        "dropout 1",
        lambda t: al.inject(lin(), "lora", dropout=1.0, targets=["0"]),
        al.ConfigError,
        r"dropout=1.0",
        r"\[0, 0.999\]",
    ),
    (
        "bad conv_mode",
        lambda t: al.inject(lin(), "lora", conv_mode="x", targets=["0"]),
        al.ConfigError,
        r"conv_mode='x'",
        r"'kernel'",
    ),
    (
        "unknown method",
        lambda t: al.inject(lin(), "loar"),
        al.UnknownMethodError,
        r"'loar'",
        r"choose one of .*lora",
    ),
    (
        "unknown option",
        lambda t: al.inject(lin(), "lora", rank=4),
        al.ConfigError,
        r"\['rank'\]",
        r"valid options: .*\br\b",
    ),
    (
        "no target match",
        lambda t: al.inject(tiny_llama(), "lora", targets=["q_prj"]),
        al.TargetError,
        r"'q_prj'",
        r"closest: 'model.layers.0.self_attn.q_proj'|'q_proj'",
    ),
    (
        "bad regex",
        lambda t: al.inject(lin(), "lora", targets="(("),
        al.ConfigError,
        r"'\(\('",
        r"regular expression",
    ),
    (
        "unsupported module",
        lambda t: al.inject(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "lora", targets=["1"]),
        al.UnsupportedModuleError,
        r"'1' \(LayerNorm\)",
        r"Narrow `targets`",
    ),
    (
        "bad layers",
        lambda t: al.inject(lin(), "lora", layers=[-1]),
        al.ConfigError,
        r"layers=\[-1\]",
        r"layer indices >= 0",
    ),
    (
        "bad adapter name",
        lambda t: al.inject(lin(), "lora", name="a.b", targets=["0"]),
        al.AdapterNameError,
        r"'a.b'",
        r"letters, digits",
    ),
    (
        "duplicate name",
        lambda t: duplicate(),
        al.AdapterNameError,
        r"'default' exists",
        r"choose another name",
    ),
    (
        "unknown active",
        lambda t: set_active_unknown(),
        al.AdapterNameError,
        r"\['nope'\]",
        r"adapters: \['default'\]",
    ),
    ("merge twice", lambda t: merged_twice(), al.MergeError, r"\['default'\] are merged already", r"unmerge"),
    ("delete merged", lambda t: delete_merged(), al.MergeError, r"'default' is merged", r"unmerge"),
    (
        "shape mismatch on load",
        shape_mismatch,
        al.FingerprintMismatchError,
        r"\[4, 5\]",
        r"Load it into the model",
    ),
    ("corrupted file", corrupted, al.AdapterFileError, r"adapter_model.safetensors", r"re-save"),
    (
        "missing file",
        missing_file,
        al.AdapterFileError,
        r"no adapter_model.safetensors",
        r"adapter directory",
    ),
    ("newer format", newer, al.AdapterFileError, r"format version 7", r"Upgrade adapterlab"),
    ("pickle offered", pickle_dir, al.AdapterFileError, r"adapter_model.bin", r"safetensors.torch.save_file"),
    (
        "model is target",
        lambda t: al.inject(nn.Linear(2, 2), "lora", targets=".*"),
        al.TargetError,
        r"model itself",
        r"nn.Sequential",
    ),
    (
        "kwargs with config",
        lambda t: al.inject(lin(), al.LoRAConfig(targets=["0"]), r=4),
        al.ConfigError,
        r"\['r'\]",
        r"dataclasses.replace",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_value_and_fix(tmp_path, case):
    _, call, error, value, fix = case
    with pytest.raises(error) as info:
        call(tmp_path)
    assert isinstance(info.value, al.AdapterlabError)
    message = str(info.value)
    assert message.count("\n") == 0
    assert re.search(value, message), message
    assert re.search(fix, message), message


def test_there_are_at_least_15_cases():
    assert len({c[2] for c in CASES}) >= 6 and len(CASES) >= 15
