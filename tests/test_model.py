"""Model-level API: inject, several adapters, stacking, disabled, merge/unmerge, unload, delete."""

import pytest
import torch
from conftest import randomize_lora, tiny_gpt2, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import adapterlab as al
from adapterlab.layer import AdapterLayer


def test_only_adapter_parameters_train(llama):
    al.inject(llama, "lora", r=4)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.default.lora_" in n for n in trainable)
    s = al.trainable_summary(llama)
    assert s.trainable == sum(p.numel() for n, p in llama.named_parameters() if n in trainable)
    assert s.per_adapter["default"][0] == s.trainable
    assert "trainable params" in str(s)


def test_all_linear_skips_the_output_head_and_wraps_every_projection(llama):
    al.inject(llama, "lora", r=4)
    wrapped = {n for n, m in llama.named_modules() if isinstance(m, AdapterLayer)}
    assert "lm_head" not in wrapped
    assert len(wrapped) == 2 * 7  # q k v o gate up down per layer
    gpt = al.inject(tiny_gpt2(), "lora", r=4)
    assert {n.rsplit(".", 1)[-1] for n, m in gpt.named_modules() if isinstance(m, AdapterLayer)} == {
        "c_attn",
        "c_proj",
        "c_fc",
    }


def test_training_changes_only_the_adapter(llama, ids):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    al.inject(llama, "lora", r=4)
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    llama.train()
    for _ in range(3):
        llama(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = llama.state_dict()
    for k, v in before.items():
        key = k if k in after else k.replace(k.rsplit(".", 1)[0], k.rsplit(".", 1)[0] + ".base_layer")
        assert torch.equal(after[key], v), k
    assert any(after[k].abs().sum() > 0 for k in after if "lora_B" in k)


def two_adapters(llama):
    al.inject(llama, "lora", name="a", r=4, targets=["q_proj", "v_proj"])
    al.inject(llama, "lora", name="b", r=2, targets="all-linear")
    randomize_lora(llama, std=0.05)
    return llama


def test_stacking_adds_deltas_and_equals_merging_one_then_the_other(llama, ids):
    two_adapters(llama)
    assert al.active(llama) == {"a": 1.0, "b": 1.0}
    with torch.no_grad():
        both = llama(input_ids=ids).logits
        al.set_active(llama, ["a"])
        only_a = llama(input_ids=ids).logits
        al.set_active(llama, {"a": 1.0, "b": 0.5})
        half_b = llama(input_ids=ids).logits
        al.set_active(llama, ["a", "b"])
        al.merge(llama, ["a"])
        al.merge(llama, ["b"])
        merged = llama(input_ids=ids).logits
    assert not torch.allclose(both, only_a, atol=1e-4)
    assert not torch.allclose(half_b, both, atol=1e-4) and not torch.allclose(half_b, only_a, atol=1e-4)
    assert torch.allclose(merged, both, atol=1e-5)


def test_disabled_runs_the_base_model_even_when_merged(llama, ids):
    with torch.no_grad():
        base = llama(input_ids=ids).logits
        two_adapters(llama)
        adapted = llama(input_ids=ids).logits
        with al.disabled(llama):
            assert torch.allclose(llama(input_ids=ids).logits, base, atol=1e-6)
        al.merge(llama)
        with al.disabled(llama):
            assert torch.allclose(llama(input_ids=ids).logits, base, atol=1e-5)
        assert torch.allclose(llama(input_ids=ids).logits, adapted, atol=1e-5)


def test_unload_gives_back_the_plain_model(llama, ids):
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    with torch.no_grad():
        two_adapters(llama)
        adapted = llama(input_ids=ids).logits
        al.merge(llama, ["a"])
        al.unload(llama)
    assert not any(isinstance(m, AdapterLayer) for m in llama.modules())
    assert state.keys() == llama.state_dict().keys()
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in llama.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in llama.named_parameters()}
    llama2 = two_adapters(tiny_llama())
    al.unload(llama2, merge=True)
    with torch.no_grad():
        assert torch.allclose(llama2(input_ids=ids).logits, adapted, atol=1e-5)


def test_delete_removes_the_adapter_and_empty_wrappers(llama, ids):
    with torch.no_grad():
        al.inject(llama, "lora", name="a", r=4, targets=["q_proj"])
        randomize_lora(llama)
        only_a = llama(input_ids=ids).logits
        al.inject(llama, "lora", name="b", r=4, targets=["k_proj"])
        randomize_lora(llama, seed=5, adapter="b")
        al.delete(llama, "b")
        assert list(al.adapters(llama)) == ["a"]
        assert not any(isinstance(m, AdapterLayer) for n, m in llama.named_modules() if n.endswith("k_proj"))
        assert torch.allclose(llama(input_ids=ids).logits, only_a)


def test_second_adapter_freezes_the_first(llama):
    al.inject(llama, "lora", name="a", r=4)
    al.inject(llama, "lora", name="b", r=4)
    names = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert names and all(".deltas.b." in n for n in names)


def test_merge_safe_refuses_nan_and_changes_nothing(llama):
    al.inject(llama, "lora", r=4)
    randomize_lora(llama)
    with torch.no_grad():
        last = [m for m in llama.modules() if isinstance(m, AdapterLayer)][-1]
        last.deltas["default"].lora_B.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(al.MergeError, match="NaN/Inf"):
        al.merge(llama)
    after = llama.state_dict()
    assert all(torch.equal(v, after[k]) or torch.isnan(v).any() for k, v in before.items())
    assert not any(m.merged for m in llama.modules() if isinstance(m, AdapterLayer))


failing_injects = st.sampled_from(
    [
        dict(method="lora", r=0),
        dict(method="lora", targets=["q_proj", "nope"]),
        dict(method="lora", targets=["model"]),  # a container, not a Linear
        dict(method="lora", targets="all-conv"),
        dict(method="lora", name="bad.name"),
        dict(method="lora", name="first"),  # taken
        dict(method="nosuch"),
        dict(method="lora", r=4, layers=[7]),
    ]
)


@given(failing_injects)
def test_failed_inject_leaves_the_model_unchanged(kwargs):
    model = tiny_llama()
    al.inject(model, "lora", name="first", r=2, targets=["q_proj"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(al.AdapterlabError):
        al.inject(model, **kwargs)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in state.items())


def test_inject_with_config_object_and_layer_attributes_fall_through():
    model = nn.Sequential(nn.Linear(4, 3))
    al.inject(model, al.LoRAConfig(r=2, targets=["0"]), name="x")
    assert model[0].in_features == 4 and model[0].weight.shape == (3, 4)
    assert al.adapters(model)["x"].r == 2
