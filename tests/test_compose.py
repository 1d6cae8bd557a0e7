"""al.combine against independent numpy references, whole-matrix comparisons."""

import numpy as np
import pytest
import torch
from conftest import randomize_lora
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterlab as al

HOWS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd"]


def model_with(ranks=(2, 3, 4), seed=0, conv=False):
    torch.manual_seed(seed)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Conv2d(5, 4, 1))
        kw = dict(targets="all-conv", conv_mode="reshape")
    else:
        model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 6))  # min dims equal: rank 6 is exact
        kw = dict(targets="all-linear")
    for i, r in enumerate(ranks):
        al.inject(model, "lora", name=f"t{i}", r=r, alpha=float(r + 1), **kw)
    randomize_lora(model, std=0.5, seed=seed + 1)
    return model


def deltas(model, name):
    """{path: ΔW as float64 numpy}, straight from the factors (B·A·α/r), not via delta_weight."""
    out = {}
    for path, m in model.named_modules():
        if hasattr(m, "deltas") and name in m.deltas:
            d = m.deltas[name]
            b, a = d.lora_B.weight.detach().double(), d.lora_A.weight.detach().double()
            out[path] = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).numpy() * d.scaling
    return out


def np_trim(t, density):
    k = int(density * t.size)  # ⌊density·n⌋, as peft and mergekit
    keep = np.zeros(t.size, bool)
    keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = True
    return t * keep.reshape(t.shape)


def np_ties(ts, ws):
    """Sign elected on the unweighted Σ τ (0 counts as +), mean of wᵢ·τᵢ over the agreeing inputs."""
    s = np.stack(ts)
    sign = np.where(s.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(s) == sign
    weighted = s * np.asarray(ws).reshape(-1, *[1] * (s.ndim - 1))
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("how", HOWS)
def test_one_adapter_with_weight_one_is_reproduced(how):
    model = model_with()
    opts = dict(density=1.0, p=0.0) if how not in ("cat", "svd") else {}
    al.combine(model, {"t1": 1.0}, how=how, into="out", **opts)
    want, got = deltas(model, "t1"), deltas(model, "out")
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_cat_is_exact_and_ranks_add(conv):
    model = model_with(conv=conv)
    weights = {"t0": 0.7, "t1": -1.3, "t2": 2.0}
    report = al.combine(model, weights, how="cat", into="cat")
    assert report.rank == 9 and al.adapters(model)["cat"].r == 9
    want = {p: sum(w * deltas(model, n)[p] for n, w in weights.items()) for p in deltas(model, "t0")}
    for path, dw in deltas(model, "cat").items():
        np.testing.assert_allclose(dw, want[path], atol=1e-5)
    x = torch.randn(3, 3, 6, 6) if conv else torch.randn(3, 7)
    with torch.no_grad():
        al.set_active(model, weights)
        stacked = model(x)
        al.set_active(model, ["cat"])
        assert torch.allclose(model(x), stacked, atol=1e-4)


def test_linear_with_negative_weights():
    model = model_with()
    al.combine(model, {"t0": 1.0, "t1": -0.5}, how="linear", into="out", rank=5)  # ranks 2 + 3: exact
    for path, dw in deltas(model, "out").items():
        np.testing.assert_allclose(dw, deltas(model, "t0")[path] - 0.5 * deltas(model, "t1")[path], atol=1e-5)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_per_tensor(density):
    model = model_with(ranks=(4, 4, 4))
    weights = {"t0": 1.0, "t1": 0.5, "t2": 1.0}
    al.combine(model, weights, how="ties", into="out", density=density, rank=6)
    for path, dw in deltas(model, "out").items():
        want = np_ties([np_trim(deltas(model, n)[path], density) for n in weights], list(weights.values()))
        np.testing.assert_allclose(dw, want, atol=1e-5)  # rank 6 = full rank here, so exact


def test_ties_global_trim_uses_one_threshold_per_adapter():
    model = model_with(ranks=(4, 4))
    al.combine(
        model, {"t0": 1.0, "t1": 1.0}, how="ties", into="out", density=0.3, trim_scope="global", rank=6
    )
    tv = {n: deltas(model, n) for n in ("t0", "t1")}
    thr = {
        n: np.sort(np.concatenate([np.abs(v).ravel() for v in tv[n].values()]))[::-1][
            int(0.3 * sum(v.size for v in tv[n].values())) - 1
        ]
        for n in tv
    }
    for path, dw in deltas(model, "out").items():
        want = np_ties(
            [np.where(np.abs(tv[n][path]) >= thr[n] * (1 - 1e-6), tv[n][path], 0) for n in tv], [1.0, 1.0]
        )
        np.testing.assert_allclose(dw, want, atol=1e-5)
    per_tensor = deltas(model_with(ranks=(4, 4)), "t0")  # a global trim keeps unequal fractions per tensor
    kept = [np.mean(np.abs(v) >= thr["t0"]) for v in per_tensor.values()]
    assert max(kept) != min(kept)


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_with_fixed_seed_equals_tau_m_over_1_minus_p(how):
    model = model_with(ranks=(5, 5))
    weights, p = {"t0": 1.0, "t1": 0.5}, 0.4
    al.combine(model, weights, how=how, into="out", p=p, seed=7, rank=6)
    gen = torch.Generator().manual_seed(7)
    for path, dw in deltas(model, "out").items():  # targets in model order, inputs in weights order
        dropped = []
        for n in weights:
            tau = deltas(model, n)[path]
            m = (torch.rand(tau.shape, generator=gen) >= p).numpy()
            dropped.append(tau * m / (1 - p))
        ws = list(weights.values())
        want = (
            sum(w * d for w, d in zip(ws, dropped, strict=True))
            if how == "dare_linear"
            else np_ties(dropped, ws)
        )
        np.testing.assert_allclose(dw, want, atol=1e-5)


def test_magnitude_prune():
    model = model_with()
    al.combine(model, {"t0": 1.0, "t1": 2.0}, how="magnitude_prune", into="out", density=0.25, rank=6)
    for path, dw in deltas(model, "out").items():
        want = np_trim(deltas(model, "t0")[path], 0.25) + 2.0 * np_trim(deltas(model, "t1")[path], 0.25)
        np.testing.assert_allclose(dw, want, atol=1e-5)


@given(rank=st.integers(1, 4), seed=st.integers(0, 100))
def test_svd_error_equals_the_tail_singular_values(rank, seed):
    model = model_with(ranks=(3, 4), seed=seed)
    report = al.combine(model, {"t0": 1.0, "t1": 1.0}, how="svd", into="out", rank=rank)
    total = 0.0
    for path, dw in deltas(model, "out").items():
        full = deltas(model, "t0")[path] + deltas(model, "t1")[path]
        s = np.linalg.svd(full, compute_uv=False)
        err = np.linalg.norm(full - dw)
        assert err == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), abs=1e-4)
        assert report.discarded[path] == pytest.approx((s[rank:] ** 2).sum(), rel=1e-4, abs=1e-8)
        total += (s**2).sum()
    assert report.discarded_fraction == pytest.approx(sum(report.discarded.values()) / total)


def test_stacking_equals_merging_one_then_the_other():
    model = model_with(ranks=(2, 3))
    x = torch.randn(4, 7)
    with torch.no_grad():
        al.set_active(model, {"t0": 1.0, "t1": 1.0})
        stacked = model(x)
        al.merge(model, ["t0"])
        al.merge(model, ["t1"])
        assert torch.allclose(model(x), stacked, atol=1e-5)


def test_combined_adapter_is_added_inactive_frozen_and_saves(tmp_path):
    model = model_with()
    al.combine(model, {"t0": 1.0, "t1": 1.0}, how="cat", into="both")
    assert "both" not in al.active(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".both." in n)
    al.save(model, tmp_path, name="both")
    fresh = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 6))
    fresh.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "deltas" not in k}
    )
    al.load(fresh, tmp_path)
    x = torch.randn(2, 7)
    al.set_active(model, ["both"])
    assert torch.allclose(fresh(x), model(x))


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [n for n, _ in model.named_modules()],
        dict(al.active(model)),
    )


BAD = [
    (dict(weights={"t0": 1.0, "zz": 1.0}), al.AdapterNameError, r"\['zz'\]"),
    (dict(weights={"t0": 1.0, "odd": 1.0}), al.UnsupportedModuleError, r"same modules"),
    (dict(weights={"t0": 1.0}, how="ties", density=0.0), al.ConfigError, r"density=0.0"),
    (dict(weights={"t0": 1.0}, how="ties", density=1.5), al.ConfigError, r"density=1.5"),
    (dict(weights={"t0": 1.0}, how="svd", rank=99), al.ConfigError, r"rank=99.*larger than min"),
    (dict(weights={"t0": 1.0}, how="mean"), al.ConfigError, r"how='mean'"),
    (dict(weights={"t0": 1.0}, how="dare_linear", p=1.0), al.ConfigError, r"p=1.0"),
    (dict(weights={"t0": float("nan")}), al.ConfigError, r"finite"),
    (dict(weights={}), al.ConfigError, r"non-empty"),
    (dict(weights={"t0": 1.0}, into="t1"), al.AdapterNameError, r"'t1' exists"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[2] for c in BAD])
def test_bad_input_leaves_model_untouched(case):
    kwargs, error, message = case
    model = model_with()
    al.inject(model, "lora", name="odd", targets=["0"])
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        al.combine(model, **{"into": "out", **kwargs})
    after = _snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())


def test_cat_refuses_non_lora_inputs():
    from adapterlab.layer import Delta

    class Dense(Delta):
        def delta_weight(self):
            return torch.ones(6, 7)

    model = model_with(ranks=(2,))
    model[0].deltas["t0"] = Dense(al.adapters(model)["t0"])  # a non-LoRA delta under a LoRA name
    with pytest.raises(al.UnsupportedModuleError, match="how='cat' concatenates LoRA factors"):
        al.combine(model, {"t0": 1.0}, how="cat")


def dense_of(model, name):
    return {
        p: m.deltas[name].delta_weight().detach().double().numpy()
        for p, m in model.named_modules()
        if hasattr(m, "deltas") and name in m.deltas
    }


@pytest.mark.parametrize("how", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_dense_and_sparse_outputs_are_exact(how, kind):
    model = model_with(ranks=(3, 4))
    weights = {"t0": 1.0, "t1": -0.7}
    al.combine(model, weights, how=how, into="out", kind=kind, density=0.3, p=0.5, seed=3)
    gen = torch.Generator().manual_seed(3)
    for path, got in dense_of(model, "out").items():
        taus = {n: deltas(model, n)[path] for n in weights}
        if how == "linear":
            want = sum(w * taus[n] for n, w in weights.items())
        elif how.startswith("dare"):
            dropped = [
                taus[n] * (torch.rand(taus[n].shape, generator=gen) >= 0.5).numpy() / 0.5 for n in weights
            ]
            ws = list(weights.values())
            want = (
                sum(w * d for w, d in zip(ws, dropped, strict=True))
                if how == "dare_linear"
                else np_ties(dropped, ws)
            )
        else:
            trimmed = [np_trim(taus[n], 0.3) for n in weights]
            ws = list(weights.values())
            want = (
                sum(w * t for w, t in zip(ws, trimmed, strict=True))
                if how == "magnitude_prune"
                else np_ties(trimmed, ws)
            )
        np.testing.assert_allclose(got, want, atol=1e-5)
    out = al.adapters(model)["out"]
    assert out.method == ("dense" if kind == "dense" else "sft")
    if kind == "sparse":
        layer = model[0]
        assert layer.deltas["out"].k == int(np.count_nonzero(dense_of(model, "out")["0"]))


def test_mixed_lora_sparse_and_dense_inputs(tmp_path):
    model = model_with(ranks=(2,))
    al.combine(model, {"t0": 1.0}, how="linear", into="dense_in", kind="dense")
    al.combine(model, {"t0": 0.5}, how="magnitude_prune", into="sparse_in", kind="sparse", density=0.4)
    weights = {"t0": 1.0, "dense_in": -0.5, "sparse_in": 2.0}
    al.combine(model, weights, how="linear", into="mix", kind="dense")
    for path, got in dense_of(model, "mix").items():
        want = sum(w * dense_of(model, n)[path] for n, w in weights.items())
        np.testing.assert_allclose(got, want, atol=1e-5)
    x = torch.randn(3, 7)
    with torch.no_grad():
        al.set_active(model, weights)
        stacked = model(x)
        al.set_active(model, ["mix"])
        assert torch.allclose(model(x), stacked, atol=1e-5)
    for name in ("mix", "sparse_in"):
        al.save(model, tmp_path / name, name=name)
        fresh = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 6))
        fresh.load_state_dict(
            {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "deltas" not in k}
        )
        al.load(fresh, tmp_path / name, name=name)
        al.set_active(model, [name])
        with torch.no_grad():
            assert torch.allclose(fresh(x), model(x), atol=1e-6)


def test_the_tensor_level_functions_are_what_combine_uses():
    """`arithmetic.combine_tensors` works on a dict of ΔW tensors alone (no model): the math
    al.combine, `adapterlab combine` and the streaming merge share."""
    from adapterlab.arithmetic import combine_tensors, disjoint_mean, trim

    gen = torch.Generator().manual_seed(0)
    taus = {"a": torch.randn(6, 5, generator=gen), "b": torch.randn(6, 5, generator=gen)}
    weights = {"a": 1.0, "b": -0.5}
    torch.testing.assert_close(combine_tensors(taus, weights, "linear"), taus["a"] - 0.5 * taus["b"])
    expected = disjoint_mean([trim(taus["a"], 0.4), trim(taus["b"], 0.4)], [1.0, -0.5])
    torch.testing.assert_close(combine_tensors(taus, weights, "ties", density=0.4), expected)
    with pytest.raises(al.ConfigError, match="generator"):
        combine_tensors(taus, weights, "dare_linear")
    with pytest.raises(al.ConfigError, match="does not combine"):
        combine_tensors(taus, weights, "cat")


@given(
    n=st.integers(1, 40),
    inputs=st.integers(1, 4),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_ties_and_magnitude_prune_equal_peft_merge_utils(n, inputs, density, seed):
    """Same task tensors, weights and density → the same tensor as peft's `ties` and
    `magnitude_prune` (⌊density·n⌋ kept per tensor, the sign elected before weighting)."""
    from peft.utils import merge_utils

    from adapterlab.arithmetic import combine_tensors

    gen = torch.Generator().manual_seed(seed)
    taus = {f"t{i}": torch.randn(n, 3, generator=gen) for i in range(inputs)}
    weights = {k: float(w) for k, w in zip(taus, torch.randn(inputs, generator=gen).tolist(), strict=True)}
    w = torch.tensor(list(weights.values()))
    for how, theirs in (("ties", merge_utils.ties), ("magnitude_prune", merge_utils.magnitude_prune)):
        ours = combine_tensors(taus, weights, how, density=density)
        torch.testing.assert_close(ours, theirs(list(taus.values()), w, density), atol=1e-6, rtol=1e-6)
