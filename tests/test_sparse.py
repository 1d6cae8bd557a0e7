"""SparseDelta and its autograd function: gradients against dense references, O(k) state, exact merge."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterlab as al
from adapterlab.kernels.reference import sampled_matmul, scatter_dense, sparse_linear_add
from adapterlab.methods.sparse import SparseDelta, check_indices, index_dtype

KINDS = ["linear", "hf_conv1d", "conv2d"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 != 0.0 and NaNs compare."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def random_support(numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(numel, generator=gen)[:k].sort().values


def module_and_input(kind: str, n_in: int, n_out: int, dtype=torch.float32):
    if kind == "linear":
        return nn.Sequential(nn.Linear(n_in, n_out)).to(dtype), torch.randn(2, 3, n_in, dtype=dtype)
    if kind == "hf_conv1d":
        return nn.Sequential(Conv1D(n_out, n_in)).to(dtype), torch.randn(2, 3, n_in, dtype=dtype)
    return nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1)).to(dtype), torch.randn(
        2, n_in, 5, 4, dtype=dtype
    )


def with_sparse(kind: str, n_in: int, n_out: int, density: float, seed: int, dtype=torch.float32):
    """A one-module model with an SFT adapter whose support and values are random."""
    torch.manual_seed(seed)
    model, x = module_and_input(kind, n_in, n_out, dtype)
    al.inject(model, "sft", targets=["0"])
    delta = model[0].deltas["default"]
    gen = torch.Generator().manual_seed(seed)
    k = max(1, int(density * delta.numel))
    delta.set_support(random_support(delta.numel, k, gen), torch.randn(k, generator=gen) * 0.3)
    return model, x, delta


# -- the autograd function --------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((7, 5), 0), ((7, 5), 35), ((13, 11), 17)])
def test_gradcheck_fp64(transposed, shape, k):
    gen = torch.Generator().manual_seed(k)
    idx = random_support(shape[0] * shape[1], k, gen)
    n_in = shape[0] if transposed else shape[1]
    n_out = shape[1] if transposed else shape[0]
    x = torch.randn(2, 3, n_in, dtype=torch.float64, requires_grad=True)
    out = torch.randn(2, 3, n_out, dtype=torch.float64, requires_grad=True)
    values = torch.randn(idx.numel(), dtype=torch.float64, requires_grad=True)

    def f(out, x, values):
        return sparse_linear_add(out, x, values, idx.to(torch.int32), shape, transposed, 0.7)

    assert torch.autograd.gradcheck(f, (out, x, values))


@given(
    n_out=st.integers(1, 23),
    n_in=st.integers(1, 23),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 999),
    transposed=st.booleans(),
)
def test_sampled_gradient_equals_dense_gradient_at_the_support(n_out, n_in, tokens, seed, transposed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    k = int(torch.randint(0, n_in * n_out + 1, (1,), generator=gen))
    idx = random_support(n_in * n_out, k, gen)
    x = torch.randn(tokens, n_in, generator=gen, requires_grad=True)
    values = torch.randn(k, generator=gen, requires_grad=True)
    grad = torch.randn(tokens, n_out, generator=gen)
    sparse_linear_add(torch.zeros(tokens, n_out), x, values, idx, shape, transposed, 1.5).backward(grad)
    stored = scatter_dense(shape, values.detach(), idx).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = stored if transposed else stored.t()
    (1.5 * x_ref @ w).backward(grad)
    assert torch.allclose(values.grad, stored.grad.flatten()[idx], atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_sampled_matmul_is_the_product_at_the_indices():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=gen), torch.randn(4, 9, generator=gen)
    idx = torch.tensor([0, 8, 9, 30, 53], dtype=torch.int32)
    assert torch.allclose(sampled_matmul(a, b, idx, (6, 9)), (a @ b).flatten()[idx.long()], atol=1e-6)


# -- the delta ----------------------------------------------------------------------------------------
@given(
    kind=st.sampled_from(KINDS),
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    density=st.sampled_from([0.05, 0.3, 1.0]),
    seed=st.integers(0, 999),
)
def test_forward_and_value_gradient_match_the_dense_reference(kind, n_in, n_out, density, seed):
    model, x, delta = with_sparse(kind, n_in, n_out, density, seed)
    base = model[0].base_layer
    out = model(x)
    out.square().sum().backward()
    w = base.weight.detach() + scatter_dense(delta.weight_shape, delta.values.detach(), delta.indices)
    w.requires_grad_(True)
    ref = torch.func.functional_call(base, {"weight": w, "bias": base.bias.detach()}, (x,))
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(delta.values.grad, w.grad.flatten()[delta.indices.long()], atol=1e-4, rtol=1e-4)
    assert base.weight.grad is None


def test_persistent_training_state_is_o_k():
    model, x, delta = with_sparse("linear", 64, 48, 0.05, 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    model(x).sum().backward()
    opt.step()
    k = delta.k
    assert [p.shape for p in model.parameters() if p.requires_grad] == [torch.Size([k])]
    assert delta.values.grad.shape == (k,)
    state = opt.state[delta.values]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (k,)
    assert delta.indices.dtype == torch.int32 and delta.indices.shape == (k,)
    assert {n for n, _ in delta.named_buffers()} == {"indices"} and "indices" in delta.state_dict()


def test_index_dtype_and_bad_indices():
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    for bad, words in [
        (torch.tensor([3, 1]), "strictly increasing"),
        (torch.tensor([1, 1]), "strictly increasing"),
        (torch.tensor([0, 12]), "position 12"),
        (torch.tensor([-1, 2]), "position -1"),
        (torch.tensor([0.0, 1.0]), "integer"),
        (torch.zeros(2, 2, dtype=torch.long), "1-D"),
    ]:
        with pytest.raises(al.ConfigError, match=words):
            check_indices(bad, 12)


def test_unsupported_module_is_refused_by_name():
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(al.UnsupportedModuleError, match="LayerNorm"):
        al.inject(model, "sft", targets=["0"])
    with pytest.raises(al.UnsupportedModuleError, match="LayerNorm"):
        SparseDelta(al.SFTConfig(), model[0])


@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    density=st.sampled_from([0.1, 0.5, 1.0]),
    seed=st.integers(0, 999),
    with_lora=st.booleans(),
)
def test_merge_then_unmerge_is_bit_exact(kind, dtype, density, seed, with_lora):
    model, x, delta = with_sparse(kind, 6, 5, density, seed, dtype)
    weight = model[0].weight
    before = weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        al.merge(model)
        merged = model(x)
    tol = 1e-5 if dtype != torch.bfloat16 else 5e-2
    assert torch.allclose(merged.float(), unmerged.float(), atol=tol, rtol=tol)
    outside = torch.ones(weight.numel(), dtype=torch.bool)
    outside[delta.indices.long()] = False
    assert torch.equal(weight.detach().flatten()[outside], before.flatten()[outside])
    if with_lora:  # a second merge call on top, with an inexact (LoRA) delta
        al.unmerge(model)
        al.inject(model, "lora", r=2, targets=["0"], name="lora")
        with torch.no_grad():
            model[0].deltas["lora"].lora_B.weight.normal_()
        al.merge(model, ["default"])
        al.merge(model, ["lora"])
    al.unmerge(model)
    if with_lora and dtype in (torch.float32, torch.float64):
        support = ~outside
        assert torch.equal(weight.detach().flatten()[support], before.flatten()[support])
        assert torch.allclose(weight.detach(), before, atol=1e-6)
    else:
        assert torch.equal(bits(weight.detach()), bits(before))
