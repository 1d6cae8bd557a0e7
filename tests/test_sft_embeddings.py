"""LT-SFT on token embeddings (targeted by name): the sparse lookup against a dense reference,
exact composition θ + Δ_lang + Δ_task, apply → revert, train_lt_sft and the schedule with
embeddings, tied embeddings, keywords that must not pick embeddings; and the official L1
normalisation and default weight decay of train_lt_sft."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse import bits
from torch import nn

import adapterlab as al
from adapterlab.kernels.reference import scatter_dense
from adapterlab.methods.sft import PhasedDelta, train_lt_sft
from adapterlab.methods.sparse import SparseDelta
from adapterlab.model import adapter_layers


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def batches(seed=3, n=2, vocab=48):
    """Token ids below `vocab`: the embedding rows of higher ids never see a gradient."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 10), generator=gen) for _ in range(n)]


def random_sparse(module, name, gen, k=None):
    delta = module.deltas[name]
    k = k or int(torch.randint(1, delta.numel + 1, (1,), generator=gen))
    idx = torch.randperm(delta.numel, generator=gen)[:k].sort().values
    delta.set_support(idx, torch.randn(k, generator=gen))
    return delta


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.integers(1, 9),
    dim=st.integers(1, 5),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 10**6),
    ids=st.sampled_from([torch.int64, torch.int32]),
)
def test_sparse_lookup_equals_the_dense_reference_forward_and_backward(vocab, dim, shape, density, seed, ids):
    gen = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(vocab, dim)
    delta = SparseDelta(al.SFTConfig(targets=["e"]), emb)
    idx = (torch.rand(vocab * dim, generator=gen) < density).nonzero().flatten()
    delta.set_support(idx, torch.randn(idx.numel(), generator=gen))
    x = torch.randint(0, vocab, shape, generator=gen).to(ids)  # repeats, rows without support entries
    out = emb(x).detach()
    got = delta(x, out, 0.5)
    values = delta.values.detach().clone().requires_grad_(True)
    want = out + 0.5 * F.embedding(x, scatter_dense((vocab, dim), values, delta.indices))
    assert got.shape == (*shape, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    up = torch.randn(got.shape, generator=gen)
    (got * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(delta.values.grad, values.grad, rtol=1e-6, atol=1e-6)


def test_keywords_never_pick_embeddings_and_names_do():
    for keyword in ("all-linear", "all"):
        model = al.inject(tiny_llama(), "sft", targets=keyword)
        assert not any(isinstance(layer.base_layer, nn.Embedding) for _, layer in adapter_layers(model))
    model = al.inject(tiny_llama(), "sft", targets=["q_proj", "embed_tokens"])
    paths = {path for path, _ in adapter_layers(model)}
    assert "model.embed_tokens" in paths and isinstance(
        model.model.embed_tokens.deltas["default"], SparseDelta
    )


def test_embedding_with_max_norm_is_refused():
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(al.UnsupportedModuleError, match="max_norm"):
        al.inject(model, "sft", targets=["0"])
    assert not al.adapters(model)


def _two_sfts(model, gen):
    for name in ("lang", "task"):
        al.inject(model, "sft", targets=["q_proj", "embed_tokens"], name=name)
        for _, layer in adapter_layers(model):
            random_sparse(layer, name, gen)
        model.requires_grad_(False)
    al.set_active(model, ["lang", "task"])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), together=st.booleans())
def test_lang_plus_task_on_embeddings_merges_exactly_and_reverts_bit_exact(seed, together):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_llama(seed % 5)
    theta = model.model.embed_tokens.weight.detach().clone()
    _two_sfts(model, gen)
    ids = torch.randint(0, 96, (3, 7), generator=gen)
    emb = model.model.embed_tokens
    with torch.no_grad():
        stacked_rows, stacked = emb(ids), model(input_ids=ids).logits
        if together:
            al.merge(model)
        else:
            al.merge(model, ["lang"])
            al.merge(model, ["task"])
        want = theta + emb.deltas["lang"].delta_weight() + emb.deltas["task"].delta_weight()
        assert torch.equal(emb.weight, want)  # θ + Δ_lang + Δ_task, entry for entry
        assert torch.equal(emb(ids), stacked_rows)  # the unmerged lookup is the merged one, bit for bit
        torch.testing.assert_close(model(input_ids=ids).logits, stacked, rtol=0, atol=1e-5)
    al.unmerge(model)
    assert torch.equal(bits(emb.weight.detach()), bits(theta))


def test_composition_survives_save_and_load(tmp_path):
    gen = torch.Generator().manual_seed(7)
    trained = tiny_llama()
    _two_sfts(trained, gen)
    for name in ("lang", "task"):
        al.save(trained, tmp_path / name, name=name)
    ids = torch.randint(0, 96, (2, 9), generator=gen)
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    model = tiny_llama()
    for name in ("lang", "task"):
        al.load(model, tmp_path / name, name=name)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    assert isinstance(model.model.embed_tokens.deltas["task"], SparseDelta)


def test_train_lt_sft_with_embeddings_moves_only_rows_of_seen_tokens():
    model = tiny_llama()
    theta = model.model.embed_tokens.weight.detach().clone()
    res = train_lt_sft(
        model,
        batches(),
        lm_loss,
        al.SFTConfig(density=0.05, targets=["q_proj", "v_proj", "embed_tokens"]),
        steps=4,
        make_optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    )
    assert res.per_module["model.embed_tokens"] > 0 and sum(res.per_module.values()) == res.k
    emb = model.model.embed_tokens
    assert torch.equal(emb.base_layer.weight, theta)  # the base stays θ₀
    rows = emb.deltas["default"].indices.long() // emb.weight.shape[1]
    assert bool((rows < 48).all())  # tokens >= 48 never occur: zero change, never chosen
    assert float(emb.deltas["default"].values.detach().abs().sum()) > 0
    al.merge(model)
    moved = (emb.weight.detach() != theta).flatten().nonzero().flatten()
    assert set(moved.tolist()) <= set(emb.deltas["default"].indices.tolist())
    al.unmerge(model)
    assert torch.equal(bits(emb.weight.detach()), bits(theta))


def test_scheduled_sft_with_embeddings_selects_then_finishes_to_sparse():
    model = al.inject(tiny_llama(), "sft", targets=["q_proj", "embed_tokens"], density=0.05, full_steps=2)
    assert isinstance(model.model.embed_tokens.deltas["default"], PhasedDelta)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, ids in enumerate(batches(n=4)):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        al.before_step(model, step=step)
        opt.step()
        al.after_step(model, step=step, optimizer=opt)
    ids = batches(seed=9, n=1)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    al.sft.finish(model)
    delta = model.model.embed_tokens.deltas["default"]
    assert isinstance(delta, SparseDelta) and delta.k > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-6)


def test_tied_embeddings_train_unmerged_and_refuse_merging():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    theta = model.transformer.wte.weight.detach().clone()
    train_lt_sft(
        model,
        batches(),
        lm_loss,
        al.SFTConfig(density=0.05, targets=["c_attn", "wte"]),
        steps=2,
        make_optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    )
    ids = batches(seed=9, n=1)[0]
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with al.disabled(model):
            assert not torch.equal(model(input_ids=ids).logits, out)  # the lookup changed
    with pytest.raises(al.MergeError, match="tied weights"):
        al.merge(model)
    assert torch.equal(model.transformer.wte.weight, theta) and not model.transformer.wte.merged
    assert torch.equal(model.lm_head.weight, theta)  # the tied head: untouched by training too


# -- train_lt_sft: the official L1 normalisation and optimizer default -----------------------------
@pytest.mark.parametrize("l1", [0.5, 3.0])
def test_l1_is_divided_by_the_number_of_maskable_entries(l1):
    """A loss linear in W under SGD: two steps move each value by −2·lr·g, plus lr·l1/N·sign(g)
    against it on the second step (|Δ| has gradient sign(Δ) = −sign(g), and 0 at Δ = 0)."""
    x, lr = torch.randn(5, 4), 0.1
    got = {}
    for coef in (0.0, l1):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3, bias=False))
        train_lt_sft(
            model,
            [x],
            lambda m, b: m(b).sum(),
            al.SFTConfig(count=12, targets=["0"]),
            steps=2,
            make_optimizer=lambda ps: torch.optim.SGD(ps, lr=lr),
            l1=coef,
        )
        got[coef] = model[0].deltas["default"].values.detach()
    base = got[0.0]
    torch.testing.assert_close(got[l1] - base, -lr * l1 / 12 * torch.sign(base), rtol=1e-5, atol=1e-6)


def test_default_optimizer_is_adamw_without_weight_decay(monkeypatch):
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    train_lt_sft(tiny_llama(), batches(), lm_loss, al.SFTConfig(count=20), steps=1)
    assert len(made) == 2 and all(m.get("weight_decay") == 0.0 for m in made)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_sfts_on_embeddings_combine_into_sparse_and_dense_deltas(kind):
    gen = torch.Generator().manual_seed(5)
    model = tiny_llama()
    _two_sfts(model, gen)
    al.combine(model, {"lang": 1.0, "task": -0.5}, how="linear", into="both", kind=kind)
    emb = model.model.embed_tokens
    want = emb.deltas["lang"].delta_weight() - 0.5 * emb.deltas["task"].delta_weight()
    torch.testing.assert_close(emb.deltas["both"].delta_weight().detach(), want.detach())
    ids = torch.randint(0, 96, (2, 5), generator=gen)
    al.set_active(model, ["both"])
    with torch.no_grad():
        rows = emb(ids)
        torch.testing.assert_close(rows, F.embedding(ids, emb.base_layer.weight + want.detach()))


def test_sara_reaches_embeddings_by_name_too():
    model = al.inject(tiny_llama(), "sara", targets=["embed_tokens"], density=0.1)
    delta = model.model.embed_tokens.deltas["default"]
    assert isinstance(delta, SparseDelta) and delta.k > 0
    ids = batches(n=1)[0]
    with torch.no_grad():
        delta.values.normal_()
        unmerged = model(input_ids=ids).logits
        al.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=0, atol=1e-5)


# -- the CLI's streaming merge ---------------------------------------------------------------------
def _merged_checkpoint(tmp_path, base_model, adapter_model):
    from safetensors.torch import load_file

    from adapterlab.checkpoint import plan_merge, run_merge

    base_model.save_pretrained(tmp_path / "base")
    al.save(adapter_model, tmp_path / "sft")
    run_merge(plan_merge(tmp_path / "base", [tmp_path / "sft"]), tmp_path / "out", progress=False)
    return load_file(tmp_path / "out" / "model.safetensors")


def test_cli_merge_writes_theta_plus_delta_into_the_embedding(tmp_path):
    gen = torch.Generator().manual_seed(2)
    model = al.inject(tiny_llama(), "sft", targets=["q_proj", "embed_tokens"])
    for _, layer in adapter_layers(model):
        random_sparse(layer, "default", gen)
    merged = _merged_checkpoint(tmp_path, tiny_llama(), model)
    al.merge(model)
    assert torch.equal(merged["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(merged[q], model.model.layers[1].self_attn.q_proj.weight)


def test_cli_merge_refuses_an_embedding_tied_to_the_head(tmp_path):
    model = al.inject(tiny_gpt2(), "sft", targets=["wte"])
    random_sparse(model.transformer.wte, "default", torch.Generator().manual_seed(0), k=5)
    with pytest.raises(al.MergeError, match="tied"):
        _merged_checkpoint(tmp_path, tiny_gpt2(), model)
    assert not (tmp_path / "out").exists()
