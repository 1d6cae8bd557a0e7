"""HFT: the half rule per category, what trains and changes, stages, save/load, bad input."""

from collections import Counter

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import adapterlab as al
from adapterlab.methods.hft import ARCHITECTURES, layer_groups, select_half

pytestmark = pytest.mark.usefixtures("single_thread")


def mha_llama(layers: int = 4, seed: int = 0):
    """Every attention matrix the same size, so the half rule gives exactly 50% of the parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
        )
    ).eval()


def layer_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def train(model: nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_exactly_half_of_the_layer_parameters_train(seed):
    model = mha_llama()
    total = layer_params(model)
    al.inject(model, "hft", seed=seed)
    summary = al.trainable_summary(model)
    assert summary.trainable == total // 2
    assert summary.per_adapter["default"][0] == total // 2  # no trainable copy beyond the chosen half
    assert [n for n, p in model.named_parameters() if p.requires_grad and "deltas" not in n] == []


@pytest.mark.parametrize("seed", range(6))
def test_half_rule_per_category(seed):
    model = tiny_llama(layers=6)  # GQA: k/v are smaller, so the parameter share varies around 50%
    chosen = set(select_half(model, seed))
    ffn_trained = []
    for _layer, cats in layer_groups(model, ARCHITECTURES["llama"]):
        counts = {cat: sum(p in chosen for p in members) for cat, members in cats.items()}
        assert counts["attention"] == 2 and counts["norm"] == 1
        ffn_trained.append(counts["ffn"])
    assert sorted(ffn_trained) == [1, 1, 1, 2, 2, 2]  # freeze 2 of 3 in a random half, 1 of 3 elsewhere
    total = layer_params(model)
    al.inject(model, "hft", seed=seed)
    assert 0.3 < al.trainable_summary(model).trainable / total < 0.7


def test_training_changes_exactly_the_chosen_matrices(ids):
    model = tiny_llama(layers=4)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    al.inject(model, "hft", seed=3)
    chosen = al.adapters(model)["default"].targets
    train(model, ids)
    base_now = dict(model.named_parameters())
    for name, before in original.items():  # during training no base weight moves
        now = (
            base_now.get(name)
            if name in base_now
            else base_now[name.rsplit(".", 1)[0] + ".base_layer.weight"]
        )
        assert torch.equal(now, before), name
    al.merge(model)
    changed = {
        n.replace(".base_layer", "")
        for n, p in model.named_parameters()
        if "deltas" not in n and not torch.equal(p, original[n.replace(".base_layer", "")])
    }
    assert changed == {f"{path}.weight" for path in chosen}


def test_a_new_stage_draws_a_different_half_and_freezes_the_old_one(ids):
    model = tiny_llama(layers=4)
    assert select_half(model, 5) == select_half(model, 5)
    al.inject(model, "hft", seed=0, name="sft")
    train(model, ids)
    first = {n: p.detach().clone() for n, p in model.named_parameters() if ".deltas.sft." in n}
    name = al.hft.next_stage(model, seed=1)
    assert name == "hft_stage1"
    stage0, stage1 = (al.adapters(model)[n].targets for n in ("sft", name))
    assert stage0 != stage1 and len(stage0) == len(stage1)
    assert al.active(model) == {"sft": 1.0, name: 1.0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".deltas.{name}." in n for n in trainable)
    train(model, ids)
    for n, before in first.items():
        assert torch.equal(dict(model.named_parameters())[n], before)
    third = al.hft.next_stage(model)
    assert al.adapters(model)[third].seed == 2  # default: the last seed + 1
    al.set_active(model, {"sft": 1.0, name: -0.5})  # stages combine linearly, and merge as one
    with torch.no_grad():
        stacked = model(ids).logits
        al.merge(model)
        assert torch.allclose(model(ids).logits, stacked, atol=1e-5)


def test_save_load_merge_revert_reproduce_outputs(tmp_path, ids):
    model = tiny_llama(layers=4)
    with torch.no_grad():
        base_out = model(ids).logits
    al.inject(model, "hft", seed=2)
    train(model, ids)
    with torch.no_grad():
        tuned = model(ids).logits
    assert not torch.allclose(tuned, base_out, atol=1e-4)
    al.save(model, tmp_path / "stage")
    fresh = al.load(tiny_llama(layers=4), tmp_path / "stage")
    assert al.adapters(fresh)["default"].targets == al.adapters(model)["default"].targets
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, tuned, atol=1e-6)
        al.merge(fresh)
        assert torch.allclose(fresh(ids).logits, tuned, atol=1e-5)
        al.unmerge(fresh)
        with al.disabled(fresh):  # reverted: the base model again
            assert torch.allclose(fresh(ids).logits, base_out, atol=1e-6)
        plain = al.unload(fresh, merge=True)
        assert torch.allclose(plain(ids).logits, tuned, atol=1e-5)


def test_gpt2_and_bert_maps():
    gpt2 = tiny_gpt2()
    al.inject(gpt2, "hft", seed=0)
    chosen = al.adapters(gpt2)["default"].targets
    for i in range(2):  # two members per category: one of each trains
        for pair in (("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"), ("ln_1", "ln_2")):
            assert sum(f"transformer.h.{i}.{m}" in chosen for m in pair) == 1
    ids = torch.randint(0, 96, (2, 8))
    train(gpt2, ids, steps=1)
    bert = tiny_bert()
    al.inject(bert, "hft", seed=1)
    per_layer = Counter(p.split(".")[3] for p in al.adapters(bert)["default"].targets)
    assert set(per_layer) == {"0", "1", "2", "3"}
    assert sorted(per_layer.values()) == [4, 4, 4, 4]  # 2 attention + 1 of 2 ffn + 1 norm
    bert(torch.randint(0, 50, (2, 6))).logits.sum().backward()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.d(self.c(self.b(self.a(x)))))


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(self.up(x))


def test_user_categories_for_a_plain_model_and_bad_input():
    with pytest.raises(al.ConfigError, match=r"no module-category map.*holds attention.*'up', 'down'"):
        al.inject(nn.Sequential(MLPBlock(), MLPBlock()), "hft")  # nothing to derive attention from
    net = nn.Sequential(Block(), Block())
    # no names to go by: four projections of one input size are taken for attention
    assert al.hft.category_map(net) == {"": {"attention": ["a", "b", "c", "d"], "norm": ["norm"]}}
    with pytest.raises(al.TargetError, match="closest: 'b'"):
        al.inject(net, "hft", categories={"x": ["a", "bb"]})
    with pytest.raises(al.ConfigError, match="categories="):
        al.inject(net, "hft", categories={"x": "a"})
    assert al.adapters(net) == {}  # the failed injects left the model as it was
    al.inject(net, "hft", categories={"mix": ["a", "b", "c", "d"], "norm": ["norm"]}, seed=4)
    chosen = al.adapters(net)["default"].targets
    assert len(chosen) == 2 * 2 + 1  # 2 of 4 per layer; the 1-member norm trains in half the layers
    assert sum("norm" in p for p in chosen) == 1
    out = net(torch.randn(3, 8))
    out.sum().backward()


def test_layers_and_exclude_narrow_the_pool():
    model = tiny_llama(layers=4)
    chosen = select_half(model, 0, layers=[1, 2], exclude=r".*layernorm")
    assert {p.split(".")[2] for p in chosen} == {"1", "2"}
    assert not any("layernorm" in p for p in chosen)
    with pytest.raises(al.TargetError, match="layers="):
        select_half(model, 0, layers=[9])


def test_stages_on_the_same_half_combine_into_a_dense_adapter(ids):
    model = tiny_llama(layers=2)
    al.inject(model, "hft", seed=4, name="task_a")
    train(model, ids, steps=2)
    al.inject(model, "hft", seed=4, name="task_b")  # the same half, trained on other data
    train(model, ids.flip(1), steps=2)
    with torch.no_grad():
        stacked = model(ids).logits  # both active: θ = θ₀ + Δa + Δb
    al.combine(model, {"task_a": 1.0, "task_b": 1.0}, how="linear", kind="dense", into="sum")
    al.set_active(model, "sum")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, stacked, atol=1e-5)
    al.hft.next_stage(model, seed=5, name="other")  # a different half covers other modules
    with pytest.raises(al.UnsupportedModuleError, match="do not cover the same modules"):
        al.combine(model, {"task_a": 1.0, "other": 1.0}, kind="dense", into="mixed")
