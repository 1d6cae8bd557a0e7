"""Per-sample routing: each sample's output equals running it with only its adapter active."""

import pytest
import torch
from conftest import randomize_lora, tiny_gpt2, tiny_llama
from hypothesis import given
from hypothesis import strategies as st

import adapterlab as al

NAMES = ["a", "b", "c"]


def routed_model(build=tiny_llama):
    model = build()
    al.inject(model, "lora", name="a", r=4)
    al.inject(
        model, "lora", name="b", r=2, targets=["q_proj", "v_proj"] if build is tiny_llama else ["c_attn"]
    )
    al.inject(model, "lora", name="c", r=8, dropout=0.0)
    randomize_lora(model, std=0.1)
    return model


MODEL = routed_model()


def assert_each_sample_matches_its_adapter_alone(x, ids, routed):
    with torch.no_grad():
        for i, name in enumerate(ids):
            if name is None:
                with al.disabled(MODEL):
                    alone = MODEL(input_ids=x[i : i + 1]).logits
            else:
                al.set_active(MODEL, [name])
                alone = MODEL(input_ids=x[i : i + 1]).logits
            assert torch.allclose(routed[i : i + 1], alone, atol=1e-5), (i, name)
    al.set_active(MODEL, NAMES)


@given(st.lists(st.sampled_from(NAMES + [None]), min_size=1, max_size=6))
def test_each_sample_matches_its_adapter_alone(ids):
    x = torch.randint(0, 96, (len(ids), 7), generator=torch.Generator().manual_seed(len(ids)))
    with torch.no_grad(), al.routing(MODEL, ids):
        routed = MODEL(input_ids=x).logits
    assert_each_sample_matches_its_adapter_alone(x, ids, routed)


def test_routing_on_gpt2_conv1d():
    model = routed_model(tiny_gpt2)
    x = torch.randint(0, 96, (3, 5))
    with torch.no_grad():
        with al.routing(model, ["b", None, "a"]):
            routed = model(input_ids=x).logits
        al.set_active(model, ["b"])
        assert torch.allclose(routed[:1], model(input_ids=x[:1]).logits, atol=1e-5)


def test_training_through_a_routed_batch_reaches_only_the_routed_adapters():
    model = routed_model()
    for n, p in model.named_parameters():
        p.requires_grad_(".deltas." in n)
    x = torch.randint(0, 96, (4, 6))
    with al.routing(model, ["a", "a", None, "b"]):
        model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".deltas.a." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".deltas.b." in n)
    assert all(g is None for n, g in grads.items() if ".deltas.c." in n)
    # the gradient equals the sum of per-sample gradients computed with one adapter each
    a_q = "model.layers.0.self_attn.q_proj.deltas.a.lora_B.weight"
    ref = torch.zeros_like(grads[a_q])
    for i in (0, 1):
        model.zero_grad()
        al.set_active(model, ["a"])
        (
            model(input_ids=x[i : i + 1], labels=x[i : i + 1]).loss * (5 / 20)
        ).backward()  # 5 of 20 predicted tokens
        ref += dict(model.named_parameters())[a_q].grad
    assert torch.allclose(grads[a_q], ref, atol=1e-6)


def test_bad_routing_input_is_refused_and_leaves_state():
    model = routed_model()
    x = torch.randint(0, 96, (3, 5))
    with pytest.raises(al.AdapterNameError, match=r"\['zz'\]"), al.routing(model, ["a", "zz", None]):
        pass
    with pytest.raises(al.RoutingError, match="length 2 but the batch has 3"), al.routing(model, ["a", "b"]):
        model(input_ids=x)
    al.merge(model, ["a"])
    with pytest.raises(al.MergeError, match="unmerge"), al.routing(model, ["a", None, None]):
        pass
    al.unmerge(model)
    assert all(layer.routes is None for _, layer in al.model.adapter_layers(model))
    assert al.active(model) == {"a": 1.0, "b": 1.0, "c": 1.0}


@given(
    samples=st.integers(1, 5),
    tokens=st.integers(1, 6),
    k=st.integers(1, 9),
    n=st.integers(1, 9),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 999),
    grad=st.booleans(),
)
def test_per_sample_products_match_the_per_adapter_loop(samples, tokens, k, n, ranks, seed, grad):
    """The batched per-sample path gives each sample its adapter's update (none for -1), and the
    gradients of x, out and every factor, as a loop over the adapters in fp64 does."""
    from adapterlab.kernels.reference import per_sample_lora_add

    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, len(ranks), (samples,), generator=gen)
    x = torch.randn(samples, tokens, k, generator=gen, dtype=torch.float64)
    out = torch.randn(samples, tokens, n, generator=gen, dtype=torch.float64)
    As = [torch.randn(r, k, generator=gen, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(n, r, generator=gen, dtype=torch.float64) for r in ranks]
    scales = [0.5 + g for g in range(len(ranks))]
    leaves = [t.clone().requires_grad_(grad) for t in (x, out, *As, *Bs)]
    with torch.set_grad_enabled(grad):
        lx, lout, la, lb = leaves[0], leaves[1], leaves[2 : 2 + len(ranks)], leaves[2 + len(ranks) :]
        got = per_sample_lora_add(lout if grad else lout.clone(), lx, slots, la, lb, scales)
    want = out.clone()
    for g, (a, b, s) in enumerate(zip(As, Bs, scales, strict=True)):
        rows = (slots == g).nonzero().flatten()
        want[rows] += s * x[rows] @ a.t() @ b.t()
    torch.testing.assert_close(got.detach(), want)
    if grad:

        def fn(x, out, *factors):
            return per_sample_lora_add(out, x, slots, factors[: len(ranks)], factors[len(ranks) :], scales)

        assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_long_samples_take_the_batched_path_and_match_each_adapter_alone(monkeypatch):
    """Samples of ≥ 2·r tokens (here r ≤ 8, 17 tokens) run the per-sample batched products."""
    from adapterlab.kernels import reference

    calls = []
    batched = reference.per_sample_lora_add
    monkeypatch.setattr(reference, "per_sample_lora_add", lambda *a: calls.append(1) or batched(*a))
    x = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(3))
    ids = ["c", None, "a", "b"]
    with torch.no_grad(), al.routing(MODEL, ids):
        routed = MODEL(input_ids=x).logits
    assert len(calls) == 14  # every adapted linear of the 2-layer Llama
    assert_each_sample_matches_its_adapter_alone(x, ids, routed)
