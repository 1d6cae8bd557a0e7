"""save / load: exact round-trip, atomic directory writes, fingerprints, unsafe and broken files."""

import json

import pytest
import torch
from conftest import conv_net, randomize_lora, read_weights, tiny_gpt2, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import adapterlab as al
from adapterlab.io import CONFIG_FILE, WEIGHTS_FILE

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "conv": conv_net}


def inputs(kind):
    if kind == "conv":
        return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def run(model, kind, x):
    with torch.no_grad():
        return model(x) if kind == "conv" else model(input_ids=x).logits


@given(
    kind=st.sampled_from(sorted(MODELS)),
    r=st.integers(1, 8),
    mode=st.sampled_from(["kernel", "reshape"]),
    rslora=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_save_load_reproduces_outputs_exactly(tmp_path_factory, kind, r, mode, rslora, seed):
    tmp = tmp_path_factory.mktemp("adapter")
    model = MODELS[kind]()
    targets = "all-conv" if kind == "conv" else "all-linear"
    al.inject(model, "lora", r=r, rslora=rslora, conv_mode=mode, targets=targets, name="task")
    randomize_lora(model, seed=seed)
    x = inputs(kind)
    want = run(model, kind, x)
    al.save(model, tmp, name="task")
    fresh = MODELS[kind]()
    al.load(fresh, tmp, name="task")
    assert torch.equal(run(fresh, kind, x), want)
    assert al.adapters(fresh)["task"] == al.adapters(model)["task"]
    assert not any(p.requires_grad for p in fresh.parameters())


def test_load_trainable_and_config_round_trip(tmp_path, llama):
    al.inject(llama, "lora", r=3, alpha=7.0, dropout=0.2, targets=["q_proj", "o_proj"], layers=[1])
    al.save(llama, tmp_path)
    fresh = al.load(tiny_llama(), tmp_path, trainable=True)
    cfg = al.adapters(fresh)["default"]
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.layers) == (3, 7.0, 0.2, [1])
    assert cfg.targets == ["q_proj", "o_proj"]
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("layers.1." in n for n in trainable)


def test_file_layout_and_metadata(tmp_path, llama):
    al.inject(llama, "lora", r=2, targets=["q_proj"])
    al.save(llama, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    tensors, meta = read_weights(tmp_path / WEIGHTS_FILE)
    keys, block = set(tensors), json.loads(meta["adapterlab"])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert block["format_version"] == 1 and block["method"] == "lora"
    assert block["fingerprint"]["modules"]["model.layers.1.self_attn.q_proj"]["shape"] == [32, 32]
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["peft_type"] == "LORA"


def test_reshape_mode_saves_our_block_in_the_json(tmp_path):
    model = conv_net()
    al.inject(model, "convlora", r=2)
    al.save(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert "peft_type" not in cfg and cfg["adapterlab"]["config"]["conv_mode"] == "reshape"


def test_save_replaces_atomically_and_keeps_foreign_files(tmp_path, llama):
    al.inject(llama, "lora", r=2, targets=["q_proj"])
    al.save(llama, tmp_path / "ad")
    (tmp_path / "ad" / "README.md").write_text("notes")
    randomize_lora(llama)
    al.save(llama, tmp_path / "ad")
    assert (tmp_path / "ad" / "README.md").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp or old dirs left
    fresh = al.load(tiny_llama(), tmp_path / "ad")
    a = dict(fresh.named_parameters())
    b = dict(llama.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a if "lora" in k)


def test_save_failure_leaves_previous_adapter(tmp_path, llama, monkeypatch):
    al.inject(llama, "lora", r=2, targets=["q_proj"])
    al.save(llama, tmp_path / "ad")
    before = (tmp_path / "ad" / WEIGHTS_FILE).read_bytes()
    randomize_lora(llama)
    import adapterlab.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "rename", boom)
    with pytest.raises(OSError, match="disk full"):
        al.save(llama, tmp_path / "ad")
    assert (tmp_path / "ad" / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_fingerprint_mismatch_names_the_module(tmp_path, llama):
    al.inject(llama, "lora", r=2, targets=["q_proj"])
    al.save(llama, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(al.FingerprintMismatchError, match=r"q_proj' has weight shape \[48, 48\]"):
        al.load(other, tmp_path)
    assert not al.adapters(other)


def test_newer_format_is_refused(tmp_path, llama):
    al.inject(llama, "lora", r=2, targets=["q_proj"])
    al.save(llama, tmp_path)
    tensors, meta = read_weights(tmp_path / WEIGHTS_FILE)
    block = json.loads(meta["adapterlab"])
    block["format_version"] = 99
    save_file(tensors, tmp_path / WEIGHTS_FILE, metadata={"adapterlab": json.dumps(block)})
    with pytest.raises(al.AdapterFileError, match="format version 99.*Upgrade adapterlab"):
        al.load(tiny_llama(), tmp_path)


def test_pickle_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(al.AdapterFileError, match="never unpickles"):
        al.load(nn.Sequential(nn.Linear(2, 2)), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_json", "missing_json", "no_dir"])
def test_damaged_files_raise_adapter_file_error(tmp_path, llama, damage):
    al.inject(llama, "lora", r=2, targets=["q_proj"], conv_mode="kernel")
    al.save(llama, tmp_path / "ad")
    w, c = tmp_path / "ad" / WEIGHTS_FILE, tmp_path / "ad" / CONFIG_FILE
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "garbage":
        w.write_bytes(b"\xff" * 64)
    elif damage in ("bad_json", "missing_json"):
        save_file(read_weights(w)[0], w)  # without our header, so the JSON is what is read
        c.write_text("{not json") if damage == "bad_json" else c.unlink()
    target = tmp_path / ("nowhere" if damage == "no_dir" else "ad")
    fresh = tiny_llama()
    with pytest.raises(al.AdapterFileError):
        al.load(fresh, target)
    assert not al.adapters(fresh)


def test_shape_mismatch_on_load(tmp_path, llama):
    al.inject(llama, "lora", r=2, targets=["q_proj"])
    al.save(llama, tmp_path)
    tensors, meta = read_weights(tmp_path / WEIGHTS_FILE)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(2, 31)
    save_file(tensors, tmp_path / WEIGHTS_FILE, metadata=meta)
    with pytest.raises(al.AdapterFileError, match=r"has shape \[2, 31\].*needs shape \[2, 32\]"):
        al.load(tiny_llama(), tmp_path)


def test_save_and_load_look_through_a_data_parallel_wrapper(tmp_path):
    """al.save(wrapper) must write the model's own module paths (no "module." prefix)."""
    model = al.inject(tiny_llama(), "lora", r=2, targets=["q_proj"])
    randomize_lora(model)
    al.save(torch.nn.DataParallel(model), tmp_path)
    fresh = tiny_llama()
    wrapper = torch.nn.DataParallel(fresh)
    assert al.load(wrapper, tmp_path) is wrapper
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
