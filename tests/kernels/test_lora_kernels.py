"""Triton LoRA kernels (run by the interpreter on CPU) against the fp64 torch reference.

Tolerance rule: the kernel's error against an fp64 reference is at most 2× the error of plain
torch in the same dtype, plus a floor of 8 ulps of the output's scale (a different summation order
alone can cost a few). The scale is that of the sums before cancellation: the same products taken
on the inputs' absolute values (the standard bound |fl(AB) − AB| ≤ γ·|A|·|B|), so a sum of
large terms that cancel to a small result is held to the rounding its terms carry. bf16 inputs are upcast to fp32 for the kernel (the interpreter's bf16
tl.dot is wrong), fp16 runs as fp16.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")
from conftest import DEVICE  # noqa: E402

from adapterlab.kernels import lora as K  # noqa: E402  (TRITON_INTERPRET is set in conftest)
from adapterlab.kernels import reference as R  # noqa: E402

EPS = {torch.float32: 1.2e-7, torch.float16: 9.8e-4}


def make(m, k, n, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    a = torch.randn(r, k, generator=gen, dtype=torch.float64) / k**0.5
    b = torch.randn(n, r, generator=gen, dtype=torch.float64) / r**0.5
    out = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    high = [t.to(DEVICE) for t in (out, x, a, b, g)]
    return [t.to(dtype) for t in high], high


def run(fn, out, x, a, b, g, scale, p, seed):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(out.detach().clone(), x, a, b, scale, p, seed)
    y.backward(g)
    return y.detach(), x.grad, a.grad, b.grad


def oracle(out, x, a, b, g, scale, p, seed):
    """fp64 truth, with the kernel's own dropout mask."""
    mask = K.keep_mask(tuple(x.shape), p, seed, x.device).double() / (1 - p) if p > 0 else torch.ones_like(x)
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = out + scale * ((x * mask) @ a.t()) @ b.t()
    y.backward(g)
    return y.detach(), x.grad, a.grad, b.grad, mask


def check(m, k, n, r, dtype, p, seed=0):
    scale = 1.7
    low, high = make(m, k, n, r, dtype, seed)
    kernel_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    truth = oracle(*high, scale, p, seed)
    magnitude = oracle(*(t.abs() for t in high), scale, p, seed)
    got = run(K.lora_add, *[t.to(kernel_dtype) for t in low], scale, p, seed)
    mask = truth[-1].to(dtype)
    # plain torch in the same dtype, same mask: the yardstick
    xs, as_, bs = (t.detach().clone().requires_grad_() for t in low[1:4])
    ys = low[0] + scale * ((xs * mask) @ as_.t()) @ bs.t()
    ys.backward(low[4])
    plain = (ys.detach(), xs.grad, as_.grad, bs.grad)
    # got and truth end with the dropout mask, which has no yardstick
    names = ("out", "dx", "dA", "dB")
    for name, t, want, yard, mag in zip(names, got[:4], truth[:4], plain, magnitude[:4], strict=True):
        assert t.shape == want.shape and t.dtype == kernel_dtype, name
        err = (t.double() - want).abs().max().item()
        budget = 2 * (yard.double() - want).abs().max().item() + 8 * EPS[kernel_dtype] * mag.max().item()
        assert err <= budget, f"{name}: kernel error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize(
    "m,k,n,r",
    [(1, 1, 1, 1), (17, 31, 13, 3), (1023, 16, 7, 2), (5, 97, 61, 64), (64, 64, 64, 16), (2, 3, 129, 33)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_odd_shapes_and_dtypes(m, k, n, r, dtype):
    check(m, k, n, r, dtype, p=0.0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_forward_and_backward_use_one_regenerated_mask(p):
    check(23, 37, 19, 4, torch.float32, p=p, seed=1234)
    mask = K.keep_mask((200, 50), p, 7, DEVICE)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.03
    assert torch.equal(mask, K.keep_mask((200, 50), p, 7, DEVICE))
    assert not torch.equal(mask, K.keep_mask((200, 50), p, 8, DEVICE))


@given(
    m=st.integers(1, 40),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    r=st.integers(1, 64),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    p=st.sampled_from([0.0, 0.2]),
)
def test_random_shapes(m, k, n, r, dtype, p):
    check(m, k, n, r, dtype, p)


@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("mask", [K.NO_MASK, K.MASK_A, K.MASK_B, K.MASK_C])
def test_split_k_matches_one_pass(split, mask):
    gen = torch.Generator().manual_seed(split)
    a, b = torch.randn(9, 70, generator=gen).to(DEVICE), torch.randn(70, 11, generator=gen).to(DEVICE)
    c0 = torch.randn(9, 11, generator=gen).to(DEVICE)
    ld = {K.MASK_A: 70, K.MASK_B: 11, K.MASK_C: 11}.get(mask, 0)
    kw = dict(alpha=0.5, accumulate=True, mask=mask, p=0.3, seed=5, mask_ld=ld)
    one = K.matmul(a, b, c0.clone(), split=1, **kw)
    many = K.matmul(a, b, c0.clone(), split=split, **kw)
    assert torch.allclose(one, many, atol=1e-5)
    if mask == K.NO_MASK:
        assert torch.allclose(one, c0 + 0.5 * a @ b, atol=1e-5)


def test_3d_input_and_in_place_add():
    (out, x, a, b, _), _ = make(6, 8, 5, 2, torch.float32)
    x3, out3 = x.view(2, 3, 8), out.view(2, 3, 5).clone()
    y = K.lora_add(out3, x3, a, b, 0.5)
    assert y.data_ptr() == out3.data_ptr() and y.shape == (2, 3, 5)
    assert torch.allclose(y.view(6, 5), R.lora_add(out.clone(), x, a, b, 0.5), atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU interpreter rules")
def test_dispatch(monkeypatch):
    from adapterlab import kernels
    from adapterlab.errors import ConfigError

    cpu = torch.zeros(1)
    monkeypatch.setenv("ADAPTERLAB_BACKEND", "auto")
    assert not kernels.use_triton(cpu, auto=True)  # auto: Triton only for CUDA tensors
    monkeypatch.setenv("ADAPTERLAB_BACKEND", "triton")
    assert kernels.use_triton(cpu)  # allowed here because TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        kernels.use_triton(cpu)
    monkeypatch.setenv("ADAPTERLAB_BACKEND", "cuda")
    with pytest.raises(ConfigError, match="'cuda'"):
        kernels.use_triton(cpu)


def test_model_forward_through_triton_backend(monkeypatch):
    from conftest import randomize_lora

    import adapterlab as al

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))
    al.inject(model, "lora", r=3)
    randomize_lora(model)
    model.to(DEVICE)
    x = torch.randn(4, 12, device=DEVICE)
    monkeypatch.setenv("ADAPTERLAB_BACKEND", "torch")
    want = model(x)
    monkeypatch.setenv("ADAPTERLAB_BACKEND", "triton")
    got = model(x)
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora" in n)


def test_dropout_through_triton_backend_draws_its_seed(monkeypatch):
    """Only the Triton path draws a Python seed (the torch path draws its mask in the graph)."""
    from conftest import randomize_lora

    import adapterlab as al

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9))
    al.inject(model, "lora", r=3, dropout=0.5)
    randomize_lora(model)
    model.to(DEVICE).train()
    x = torch.randn(4, 12, device=DEVICE)
    monkeypatch.setenv("ADAPTERLAB_BACKEND", "triton")
    y1, y2 = model(x), model(x)
    assert torch.isfinite(y1).all() and not torch.equal(y1, y2)  # a fresh seed per call
    y1.sum().backward()
    assert model[0].deltas["default"].lora_A.weight.grad is not None
