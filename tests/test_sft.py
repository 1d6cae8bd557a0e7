"""LT-SFT: top-K selection, the two-phase trainer, composition, exact apply/revert, files, bad input."""

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_sparse import bits
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterlab as al
from adapterlab.io import PREFIX, WEIGHTS_FILE
from adapterlab.methods.sft import HeadDelta, select_top_k, train_lt_sft
from adapterlab.model import adapter_layers

BODY = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def batches(seed=3, n=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 10), generator=gen) for _ in range(n)]


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def params_snapshot(model):
    return {id(p): (name, p.detach().clone()) for name, p in model.named_parameters()}


def body_weights(model):
    return {
        path: layer.base_layer.weight
        for path, layer in adapter_layers(model)
        if path.rsplit(".", 1)[-1] in BODY
    }


def test_lt_sft_moves_exactly_k_entries_and_nothing_else():
    model = tiny_llama()
    before = params_snapshot(model)
    res = train_lt_sft(
        model,
        batches(),
        lm_loss,
        al.SFTConfig(density=0.01),
        name="task",
        steps=4,
        heads=["lm_head"],
        make_optimizer=adamw,
    )
    assert res.k == round(0.01 * res.maskable) and sum(res.per_module.values()) == res.k
    assert len(res.full_losses) == len(res.sparse_losses) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.task." in n for n in trainable)
    for p in model.parameters():  # base weights, norms, embeddings: bit-identical after AdamW with decay
        if id(p) in before:
            assert torch.equal(bits(p.detach()), bits(before[id(p)][1])), before[id(p)][0]
    theta0 = {path: w.detach().clone() for path, w in body_weights(model).items()}
    head0 = model.lm_head.weight.detach().clone()
    al.merge(model)
    changed = 0
    for path, w in body_weights(model).items():
        moved = (w.detach() != theta0[path]).flatten()
        outside = torch.ones_like(moved)
        outside[model.get_submodule(path).deltas["task"].indices.long()] = False
        assert not moved[outside].any()
        changed += int(moved.sum())
    assert changed == res.k
    assert not torch.equal(model.lm_head.weight, head0)  # the head trained dense
    al.unmerge(model)
    for path, w in body_weights(model).items():
        assert torch.equal(bits(w.detach()), bits(theta0[path]))
    assert torch.equal(bits(model.lm_head.weight.detach()), bits(head0))


def test_select_top_k_takes_exactly_k_breaking_ties_by_position():
    diffs = {"a": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([[-2.0, 2.0], [0.0, 5.0]])}
    got = select_top_k(diffs, 4)
    assert got["a"].tolist() == [0, 2] and got["b"].tolist() == [0, 3]
    got = select_top_k(diffs, 2)
    assert got["a"].tolist() == [0] and got["b"].tolist() == [3]
    with pytest.raises(al.ConfigError, match="K=8"):
        select_top_k(diffs, 8)


def test_k_by_count_and_l1_pull():
    sums = {}
    for l1 in (0.0, 2e4):  # l1 is per entry of the maskable weights (~1.8e4 of them): pull ~1 each
        model = tiny_llama()
        res = train_lt_sft(
            model, batches(), lm_loss, al.SFTConfig(count=50), steps=3, make_optimizer=adamw, l1=l1
        )
        assert res.k == 50
        sums[l1] = sum(
            float(d.deltas["default"].values.detach().abs().sum()) for _, d in adapter_layers(model)
        )
    assert sums[2e4] < sums[0.0]


def _unchanged(model, before):
    assert not list(adapter_layers(model)) and not al.adapters(model)
    assert all(torch.equal(p, before[id(p)][1]) for p in model.parameters())


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(config=al.SFTConfig(count=10**7)), "count=10000000 is larger"),
        (dict(steps=0), "steps=0"),
        (dict(l1=-1.0), "l1=-1.0"),
        (dict(heads=["q_proj"]), "both sparse targets and heads"),
        (dict(heads=["nope"]), "matched no module"),
    ],
)
def test_bad_trainer_input_leaves_the_model_untouched(options, match):
    model = tiny_llama()
    before = params_snapshot(model)
    with pytest.raises(al.AdapterlabError, match=match):
        train_lt_sft(model, batches(), lm_loss, **options)
    _unchanged(model, before)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(al.ConfigError, match=f"density={density}"):
        al.SFTConfig(density=density)


# -- composition and exact revert ------------------------------------------------------------------
def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), Conv1D(3, 5), nn.Linear(3, 3))  # rank <= 3 everywhere


def add_sft(model, name, gen, supports=None):
    al.inject(model, "sft", targets=["0", "1", "2"], name=name)
    for i in range(3):
        delta = model[i].deltas[name]
        idx = (
            torch.randperm(delta.numel, generator=gen)[
                : int(torch.randint(1, delta.numel + 1, (1,), generator=gen))
            ]
            if supports is None
            else supports[i]
        )
        idx = idx.sort().values
        delta.set_support(idx, torch.randn(idx.numel(), generator=gen))


@pytest.mark.parametrize("overlap", [False, True])
def test_two_sfts_compose_to_the_sum_of_their_deltas(tmp_path, overlap):
    gen = torch.Generator().manual_seed(1)
    trained = small_model()
    splits = []
    for i in range(3):
        perm = torch.randperm(trained[i].weight.numel(), generator=gen)
        half = perm.numel() // 2
        splits.append((perm[:half], perm[half:]) if not overlap else (perm[: half + 2], perm[half - 2 :]))
    for j, name in enumerate(["lang", "task"]):
        add_sft(trained, name, gen, [s[j] for s in splits])
        al.save(trained, tmp_path / name, name=name)
    model = small_model()
    theta_pre = [model[i].weight.detach().clone() for i in range(3)]
    x = torch.randn(4, 3)
    al.load(model, tmp_path / "lang", name="lang")
    al.load(model, tmp_path / "task", name="task")
    with torch.no_grad():
        stacked = model(x)
        al.merge(model)
        merged = model(x)
    for i in range(3):
        want = (
            theta_pre[i] + trained[i].deltas["lang"].delta_weight() + trained[i].deltas["task"].delta_weight()
        )
        assert torch.equal(model[i].weight, want.detach())
    assert torch.allclose(stacked, merged, atol=1e-6)
    al.unmerge(model)
    for i in range(3):
        assert torch.equal(bits(model[i].weight.detach()), bits(theta_pre[i]))


@given(
    n=st.integers(1, 3),
    seed=st.integers(0, 10**6),
    together=st.booleans(),
    weights=st.lists(st.sampled_from([1.0, -0.5, 0.3]), min_size=3, max_size=3),
)
def test_apply_then_revert_is_the_identity(n, seed, together, weights):
    gen = torch.Generator().manual_seed(seed)
    model = small_model(seed % 7)
    before = [bits(model[i].weight.detach()).clone() for i in range(3)]
    names = [f"sft{j}" for j in range(n)]
    for name in names:
        add_sft(model, name, gen)
    al.set_active(model, dict(zip(names, weights[:n], strict=True)))
    if together:
        al.merge(model)
    else:
        for name in names:
            al.merge(model, [name])
    al.unmerge(model)
    for i in range(3):
        assert torch.equal(bits(model[i].weight.detach()), before[i])


# -- files ------------------------------------------------------------------------------------------
def test_save_load_round_trip_with_a_dense_head(tmp_path):
    model = tiny_llama()
    train_lt_sft(
        model,
        batches(),
        lm_loss,
        al.SFTConfig(density=0.02),
        steps=2,
        heads=["lm_head"],
        make_optimizer=adamw,
    )
    ids = batches(seed=9, n=1)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    al.save(model, tmp_path)
    with safe_open(tmp_path / WEIGHTS_FILE, "pt") as f:
        assert f.get_tensor(f"{PREFIX}model.layers.0.mlp.up_proj.indices").dtype == torch.int32
        assert f"{PREFIX}lm_head.weight_delta" in f.keys()
    fresh = al.load(tiny_llama(), tmp_path, trainable=True)
    assert isinstance(fresh.lm_head.deltas["default"], HeadDelta)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
    for _, layer in adapter_layers(fresh):
        got, made = layer.deltas["default"], model.get_submodule(_).deltas["default"]
        assert torch.equal(
            got.state_dict()["values" if "values" in got.state_dict() else "weight_delta"],
            made.state_dict()["values" if "values" in made.state_dict() else "weight_delta"],
        )
    assert all(p.requires_grad for n, p in fresh.named_parameters() if ".deltas." in n)


def _tamper(directory, key, value):
    with safe_open(directory / WEIGHTS_FILE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[key] = value
    save_file(tensors, directory / WEIGHTS_FILE, metadata=meta)


@pytest.mark.parametrize(
    "change,match",
    [
        ("out_of_range", "position 5000"),
        ("unsorted", "strictly increasing"),
        ("short_values", "has shape"),
    ],
)
def test_bad_sparse_files_are_refused_and_the_model_is_untouched(tmp_path, change, match):
    model = tiny_llama()
    al.inject(model, "sft", targets=["q_proj"])
    delta = model.model.layers[0].self_attn.q_proj.deltas["default"]
    delta.set_support(torch.tensor([1, 5, 9]), torch.ones(3))
    al.save(model, tmp_path)
    key = f"{PREFIX}model.layers.0.self_attn.q_proj."
    if change == "out_of_range":
        _tamper(tmp_path, key + "indices", torch.tensor([1, 5, 5000], dtype=torch.int32))
    elif change == "unsorted":
        _tamper(tmp_path, key + "indices", torch.tensor([5, 1, 9], dtype=torch.int32))
    else:
        _tamper(tmp_path, key + "values", torch.ones(2))
    fresh = tiny_llama()
    before = params_snapshot(fresh)
    with pytest.raises(al.AdapterFileError, match=match):
        al.load(fresh, tmp_path)
    _unchanged(fresh, before)


def test_loading_onto_other_shapes_is_refused(tmp_path):
    model = tiny_llama()
    al.inject(model, "sft", targets=["q_proj"])
    al.save(model, tmp_path)
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
    before = params_snapshot(other)
    with pytest.raises(al.FingerprintMismatchError, match="weight shape"):
        al.load(other, tmp_path)
    _unchanged(other, before)


def test_sfts_feed_combine_like_any_delta():
    gen = torch.Generator().manual_seed(4)
    model = small_model()
    for name in ("a", "b"):
        add_sft(model, name, gen)
    al.combine(model, {"a": 1.0, "b": -0.5}, how="linear", into="ab", kind="lora", rank=3)
    for i in range(3):
        want = model[i].deltas["a"].delta_weight() - 0.5 * model[i].deltas["b"].delta_weight()
        assert torch.allclose(model[i].deltas["ab"].delta_weight(), want.detach(), atol=1e-5)
