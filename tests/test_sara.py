"""SaRA: mask rules, frozen entries after AdamW, the nuclear-norm term, progressive re-selection, files."""

import pytest
import torch
from conftest import tiny_llama
from test_sparse import bits
from torch import nn

import adapterlab as al
from adapterlab.methods import sara
from adapterlab.model import adapter_layers


def lm_step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def test_masks_by_threshold_and_by_density():
    model = tiny_llama()
    weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    al.inject(model, "sara", threshold=2e-3, name="t")
    delta = model.model.layers[0].mlp.up_proj.deltas["t"]
    assert torch.equal(delta.indices.long(), (weight.abs().flatten() < 2e-3).nonzero().flatten())
    assert al.adapters(model)["t"].density is None
    al.inject(model, "sara", density=0.25, name="d")
    delta = model.model.layers[0].mlp.up_proj.deltas["d"]
    mags = weight.abs().flatten()
    chosen = torch.zeros_like(mags, dtype=torch.bool)
    chosen[delta.indices.long()] = True
    assert delta.k == round(0.25 * mags.numel())
    assert mags[chosen].max() < mags[~chosen].min()


def test_training_with_adamw_changes_nothing_outside_the_mask(ids):
    model = tiny_llama()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    al.inject(model, "sara", density=0.1)
    opt = adamw(model)
    for _ in range(3):
        lm_step(model, opt, ids)
    for p in model.parameters():
        if id(p) in before:
            assert torch.equal(bits(p.detach()), bits(before[id(p)]))
    al.merge(model)
    for _, layer in adapter_layers(model):
        delta, w = layer.deltas["default"], layer.base_layer.weight.detach()
        outside = torch.ones(w.numel(), dtype=torch.bool)
        outside[delta.indices.long()] = False
        assert torch.equal(
            bits(w.flatten()[outside]), bits(before[id(layer.base_layer.weight)].flatten()[outside])
        )
        assert not torch.equal(w.flatten()[~outside], before[id(layer.base_layer.weight)].flatten()[~outside])
    al.unmerge(model)
    for _, layer in adapter_layers(model):
        assert torch.equal(bits(layer.base_layer.weight.detach()), bits(before[id(layer.base_layer.weight)]))


def test_nuclear_norm_gradient_reaches_the_sparse_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(70, 80), nn.Linear(80, 64))  # only the first is eligible (min side > 64)
    al.inject(model, "sara", density=0.2, nuclear_weight=0.3, targets=["0", "1"])
    delta = model[0].deltas["default"]
    with torch.no_grad():
        delta.values.normal_()
        model[1].deltas["default"].values.normal_()
    sara.nuclear_norm_loss(model).backward()
    dw = delta.delta_weight().detach()
    u, _, vh = torch.linalg.svd(dw, full_matrices=False)
    assert torch.allclose(delta.values.grad, 0.3 * (u @ vh).flatten()[delta.indices.long()], atol=1e-5)
    assert model[1].deltas["default"].values.grad is None


def effective_rank(dw: torch.Tensor) -> int:
    s = torch.linalg.svdvals(dw)
    return int((s > 0.01 * s[0]).sum())


def train_low_rank_task(lam: float, steps: int = 100) -> torch.Tensor:
    """Fit W + T with T of rank 2 through a 10% SaRA mask; return ΔW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80, bias=False))
    target = model[0].weight.detach() + 0.05 * torch.randn(80, 2) @ torch.randn(2, 96)
    al.inject(model, "sara", density=0.1, nuclear_weight=lam, targets=["0"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(64, 96, generator=gen)
        loss = (model(x) - x @ target.t()).square().mean() + sara.nuclear_norm_loss(model, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model[0].deltas["default"].delta_weight().detach()


def test_nuclear_norm_term_lowers_the_effective_rank():
    plain, regularised = train_low_rank_task(0.0), train_low_rank_task(1e-2)
    assert effective_rank(regularised) <= 0.75 * effective_rank(plain)


def test_progressive_reselection_freezes_entries_and_training_continues(ids, tmp_path):
    model = tiny_llama()
    al.inject(model, "sara", threshold=2e-3, progressive_step=2)
    opt = adamw(model)  # weight decay 0.1: frozen entries must still not move
    layer = model.model.layers[1].mlp.down_proj
    delta = layer.deltas["default"]
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    reports = []
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        al.before_step(model, step)
        opt.step()
        reports.append(sara.progressive_update(model, step, opt))
        if step == 2:
            assert delta.values not in opt.state  # its optimizer state restarts after re-selection
            frozen_at = delta.values.detach().clone()
    assert [r is None for r in reports] == [True, True, False, True, True]
    changes = reports[2]
    assert all(after <= before for before, after in changes.values())
    assert sum(after for _, after in changes.values()) < sum(before for before, _ in changes.values())
    frozen = delta.frozen
    assert frozen.any() and delta.trained == delta.k - int(frozen.sum())
    assert torch.equal(delta.values.detach()[frozen], frozen_at[frozen])  # frozen entries kept their values
    assert not torch.equal(delta.values.detach()[~frozen], frozen_at[~frozen])  # the others kept training
    theta = (
        layer.base_layer.weight.detach().flatten()[delta.indices.long()[frozen]]
        + delta.values.detach()[frozen]
    )
    assert (theta.abs() >= 2e-3).all()
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == shapes  # nothing was reshaped
    with torch.no_grad():
        want = model(input_ids=ids).logits
    al.save(model, tmp_path)
    fresh = al.load(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
    loaded = fresh.model.layers[1].mlp.down_proj.deltas["default"]
    assert torch.equal(loaded.frozen, delta.frozen) and loaded.trained == delta.trained


def test_reselect_needs_progressive_step():
    model = tiny_llama()
    al.inject(model, "sara", threshold=2e-3)
    with pytest.raises(al.ConfigError, match="progressive_step"):
        sara.reselect(model)


def test_helpers_refuse_wrong_adapters_and_merged_state():
    model = tiny_llama()
    al.inject(model, "lora", name="lora")
    with pytest.raises(al.ConfigError, match="'lora' adapter, not SaRA"):
        sara.nuclear_norm_loss(model, name="lora")
    with pytest.raises(al.AdapterNameError, match="'nope'"):
        sara.reselect(model, name="nope")
    al.inject(model, "sara", name="s")
    assert float(sara.nuclear_norm_loss(model, name="s").detach()) == 0.0  # no weight has both sides > 64
    al.merge(model, ["s"])
    with pytest.raises(al.MergeError, match="unmerge"):
        sara.reselect(model, name="s")


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(density=0.0), "density=0.0"),
        (dict(density=1.5), "density=1.5"),
        (dict(threshold=-1e-3), "threshold"),
        (dict(nuclear_weight=-1.0), "nuclear_weight"),
        (dict(progressive_step=-2), "progressive_step"),
        (dict(density=None), "set density"),
    ],
)
def test_bad_config_values_are_refused(options, match):
    with pytest.raises(al.ConfigError, match=match):
        al.SaRAConfig(**options)
