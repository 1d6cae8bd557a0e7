"""LoRA / ConvLoRA layers: properties over shapes, ranks, dtypes and layer kinds."""

import pytest
import torch
from conftest import randomize_lora
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterlab as al
from adapterlab.kernels.reference import LoRAAdd, apply_keep, dropout_mask, keep_bits

KINDS = ["linear", "hf_conv1d", "conv1d", "conv2d", "conv3d"]


@st.composite
def layer_cases(draw):
    kind = draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    mode = draw(st.sampled_from(["kernel", "reshape"]))
    groups = draw(st.sampled_from([1, 2])) if kind.startswith("conv") else 1
    c_in = groups * draw(st.integers(1, 5))
    c_out = groups * draw(st.integers(1, 5))
    r = draw(st.integers(1, 6))
    if mode == "kernel":
        r = groups * r
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if kind == "linear":
        module, x = nn.Linear(c_in, c_out, bias=draw(st.booleans())), torch.randn(3, c_in)
    elif kind == "hf_conv1d":
        module, x = Conv1D(c_out, c_in), torch.randn(2, 3, c_in)
    else:
        nd = int(kind[4])
        k = draw(st.integers(1, 3))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        module = conv(
            c_in,
            c_out,
            k,
            stride=draw(st.integers(1, 2)),
            padding=draw(st.integers(0, 1)),
            groups=groups,
            padding_mode=draw(st.sampled_from(["zeros", "reflect"])) if k > 1 else "zeros",
        )
        x = torch.randn(2, c_in, *[5] * nd)
    return nn.Sequential(module).to(dtype), x.to(dtype), r, mode


def tolerance(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)


@given(layer_cases())
def test_zero_at_init_then_merge_equals_unmerged_and_unmerge_restores(case):
    model, x, r, mode = case
    with torch.no_grad():
        base_out = model(x)
        base_w = model[0].weight.detach().clone()
        al.inject(model, "lora", r=r, alpha=2.0 * r, conv_mode=mode, targets=["0"])
        layer = model[0]
        assert torch.count_nonzero(layer.deltas["default"].delta_weight()) == 0
        assert torch.equal(model(x), base_out)
        randomize_lora(model, std=0.3)
        unmerged = model(x)
        assert not torch.allclose(unmerged.float(), base_out.float(), atol=1e-4)
        al.merge(model)
        assert torch.allclose(model(x).float(), unmerged.float(), **tolerance(x.dtype))
        al.unmerge(model)
        w = model[0].weight
        if x.dtype == torch.float32:
            assert (w - base_w).abs().max() <= 1e-6
            assert torch.allclose(model(x), unmerged, atol=1e-5)
        else:  # bf16 cannot round-trip W + ΔW - ΔW: the pre-merge copy restores it exactly
            assert torch.equal(w, base_w)
            assert torch.equal(model(x), unmerged)


def reference_delta_out(module: nn.Module, dw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base op applied with ΔW alone, written independently of adapterlab."""
    if isinstance(module, nn.Linear):
        return x @ dw.t()
    if isinstance(module, Conv1D):
        return x @ dw
    return module._conv_forward(x, dw, None)


@given(layer_cases())
def test_forward_contribution_equals_delta_weight(case):
    model, x, r, mode = case
    model, x = model.double(), x.double()
    al.inject(model, "lora", r=r, conv_mode=mode, targets=["0"])
    randomize_lora(model)
    layer = model[0]
    with torch.no_grad():
        got = model(x) - layer.base_layer(x)
        want = reference_delta_out(layer.base_layer, layer.deltas["default"].delta_weight(), x)
    assert torch.allclose(got, want, atol=1e-10)


def test_delta_weight_matches_factors_for_linear_layouts():
    lin = nn.Sequential(nn.Linear(6, 4))
    hf = nn.Sequential(Conv1D(4, 6))
    for model in (lin, hf):
        al.inject(model, "lora", r=2, alpha=6, targets=["0"])
        randomize_lora(model)
        d = model[0].deltas["default"]
        ba = d.lora_B.weight @ d.lora_A.weight * 3.0
        assert torch.allclose(d.delta_weight(), ba if model is lin else ba.t())


@pytest.mark.parametrize("rslora,expected", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling(rslora, expected):
    assert al.LoRAConfig(r=16, alpha=32, rslora=rslora).scaling == expected


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_add_gradcheck_fp64(p):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    keep = dropout_mask(x, p, torch.Generator().manual_seed(1234)) if p > 0 else None
    assert torch.autograd.gradcheck(
        lambda o, x, a, b: LoRAAdd.apply(o, x, a, b, 1.5, p, keep, torch.float64), (out, x, a, b)
    )


def test_lora_add_dropout_matches_explicit_mask():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=gen, requires_grad=True)
    a = torch.randn(3, 4, generator=gen, requires_grad=True)
    b = torch.randn(5, 3, generator=gen, requires_grad=True)
    out = torch.zeros(7, 5)
    keep = dropout_mask(x.detach(), 0.5, torch.Generator().manual_seed(99))
    y = LoRAAdd.apply(out, x, a, b, 2.0, 0.5, keep, a.dtype)
    assert keep.dtype == torch.bool and 0 < keep.count_nonzero() < keep.numel()
    mask = keep.float() / 0.5
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y2 = 2.0 * (x2 * mask) @ a2.t() @ b2.t()
    assert torch.allclose(y, y2, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for t, t2 in ((x, x2), (a, a2), (b, b2)):
        assert torch.allclose(t.grad, t2.grad, atol=1e-5)


def saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_dropout_saves_a_bool_mask_not_a_copy_of_the_input():
    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)

    def run(p):
        model = nn.Sequential(nn.Linear(128, 128))
        al.inject(model, "lora", r=4, dropout=p, targets=["0"])
        model.train()
        return saved_bytes(lambda: model(x).sum())

    assert run(0.1) - run(0.0) == x.numel()  # one byte per entry; a dropped fp32 copy would be 4


def test_no_grad_forward_equals_autograd_forward():
    torch.manual_seed(0)
    out, x = torch.randn(5, 6), torch.randn(5, 7)
    a, b = torch.randn(3, 7, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    for p in (0.0, 0.4):
        keep = dropout_mask(x, p, torch.Generator().manual_seed(11)) if p > 0 else None
        with_grad = LoRAAdd.apply(out.clone(), x, a, b, 1.5, p, keep, a.dtype)
        with torch.no_grad():
            from adapterlab.kernels.reference import lora_add

            without = lora_add(out.clone(), x, a, b, 1.5, p, torch.Generator().manual_seed(11))
        assert torch.allclose(with_grad, without, atol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_drops_p_of_every_16_bit_slice(p):
    """Each entry's 16 bits come from one quarter of an int64 draw: every quarter (entry index mod 4)
    must drop at rate p (a draw over [0, 2⁶³) would keep every fourth entry), and a seed repeats."""
    n = 400_000
    keep = dropout_mask(torch.empty(n), p, torch.Generator().manual_seed(7))
    assert torch.equal(keep, dropout_mask(torch.empty(n), p, torch.Generator().manual_seed(7)))
    sigma = (p * (1 - p) / (n // 4)) ** 0.5
    for quarter in range(4):
        assert abs(keep[quarter::4].float().mean().item() - (1 - p)) < 5 * sigma, quarter


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    al.inject(model, "lora", r=4, dropout=0.5, targets=["0"])
    randomize_lora(model)
    x = torch.randn(4, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_grouped_conv_kernel_mode_needs_rank_divisible_by_groups():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(al.UnsupportedModuleError, match="r=6 is not divisible by the conv's groups=4"):
        al.inject(model, "lora", r=6, targets=["0"])
    al.inject(model, "lora", r=6, conv_mode="reshape", targets=["0"])  # reshape layout always fits


def test_reshape_mode_is_loralib_layout_for_square_2d_kernels():
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    al.inject(model, "convlora", r=2)
    d = model[0].deltas["default"]
    assert d.lora_A.weight.shape == (2 * 3, 4 * 3)
    assert d.lora_B.weight.shape == (6 * 3, 2 * 3)


def test_convlora_defaults_target_every_conv_in_reshape_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv1d(4, 4, 1), nn.Linear(4, 4))
    al.inject(model, "convlora", r=2)
    assert {type(m.deltas["default"]).__name__ for m in model[:2]} == {"ReshapeConvLoRA"}
    assert isinstance(model[2], nn.Linear)


def test_adapter_trains_in_fp32_on_bf16_base():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    al.inject(model, "lora", r=2, targets=["0"])
    assert model[0].deltas["default"].lora_A.weight.dtype == torch.float32
    out = model(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[0].deltas["default"].lora_B.weight.grad is not None


@given(
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    st.integers(0, 2**31 - 1),
    st.floats(0.05, 0.95),
)
def test_apply_keep_is_masked_fill_bit_for_bit(dtype, seed, p):
    """The integer-AND masking used for dropout equals `masked_fill(~keep, 0)` exactly, also on
    NaN, ±inf and -0.0, and in place."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(33, 17, generator=gen).to(dtype)
    t[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
    keep = torch.rand(t.shape, generator=gen) >= p
    want = t.masked_fill(~keep, 0)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    got = apply_keep(t, keep)
    assert torch.equal(got.view(ints), want.view(ints))
    same = t.clone()
    assert apply_keep(same, keep, keep_bits(keep, same), out=same) is same
    assert torch.equal(same.view(ints), want.view(ints))


@given(
    st.integers(1, 6),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 4),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0.0, 0.3]),
    st.integers(0, 2**31 - 1),
)
def test_fused_linear_lora_equals_base_then_lora_add(n, d_in, d_out, r, bias, train_w, p, seed):
    """The one-node base + LoRA path (plain nn.Linear, training) gives the output and every
    gradient of the base layer followed by `lora_add`, with the same dropout mask."""
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias).requires_grad_(train_w)
    layer = nn.Sequential(lin)
    al.inject(layer, "lora", r=r, dropout=p, targets=["0"])
    randomize_lora(layer)
    layer.train()
    delta = layer[0].deltas["default"]
    x = torch.randn(2, n, d_in, requires_grad=True)
    g = torch.randn(2, n, d_out)
    params = [x, *(t for t in layer.parameters() if t.requires_grad)]
    torch.manual_seed(seed + 1)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "LinearLoRABackward"
    want_grads = torch.autograd.grad(fused, params, g)
    torch.manual_seed(seed + 1)
    plain = delta(x, lin(x), 1.0)  # the base module, then the delta's own forward (lora_add)
    assert type(plain.grad_fn).__name__ != "LinearLoRABackward"
    assert torch.equal(fused, plain)
    for got, want in zip(torch.autograd.grad(plain, params, g), want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_linear_lora_gradcheck_fp64():
    from adapterlab.kernels.reference import LinearLoRA

    gen = torch.Generator().manual_seed(0)
    x, w, bias = (
        torch.randn(*s, dtype=torch.float64, generator=gen, requires_grad=True)
        for s in [(2, 3, 4), (5, 4), (5,)]
    )
    a = torch.randn(2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    for p in (0.0, 0.3):
        keep = dropout_mask(x, p, torch.Generator().manual_seed(5)) if p > 0 else None
        assert torch.autograd.gradcheck(
            lambda x, w, bias, a, b, p=p, keep=keep: LinearLoRA.apply(
                x, w, bias, a, b, 1.5, p, keep, torch.float64
            ),
            (x, w, bias, a, b),
        )


def test_fused_path_only_where_it_is_the_same_computation():
    """Hooks on the base, no_grad and DoRA keep the two-call path (a hook still fires)."""
    layer = nn.Sequential(nn.Linear(6, 4))
    al.inject(layer, "lora", r=2, targets=["0"])
    x = torch.randn(3, 6, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "LinearLoRABackward"
    calls = []
    layer[0].base_layer.register_forward_hook(lambda *a: calls.append(1))
    assert type(layer(x).grad_fn).__name__ != "LinearLoRABackward" and calls == [1]
    dora = nn.Sequential(nn.Linear(6, 4))
    al.inject(dora, "lora", r=2, use_dora=True, targets=["0"])
    assert type(dora(x).grad_fn).__name__ != "LinearLoRABackward"


@given(
    st.integers(1, 40),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(1, 4),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**31 - 1),
)
def test_inference_fold_is_the_merged_layer_and_leaves_the_weight(m, d_in, d_out, r, bias, dtype, seed):
    """Inference with enough tokens runs one GEMM with W + s·B·A: the merged layer's output, the
    unfolded output to rounding, W untouched; fewer tokens, half dtypes or a gradient to compute
    never fold."""
    from adapterlab.kernels import reference

    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(dtype)
    al.inject(layer, "lora", r=r, targets=["0"])
    randomize_lora(layer, std=0.3)
    lin, delta = layer[0].base_layer, layer[0].deltas["default"]
    w0, x = lin.weight.detach().clone(), torch.randn(m, d_in, dtype=dtype)
    folds = m * (d_in + d_out) >= 2 * d_in * d_out
    assert reference.folds_cheaper(x, lin.weight, delta.lora_A.weight) == folds
    assert not reference.folds_cheaper(x.bfloat16(), lin.weight.bfloat16(), delta.lora_A.weight.bfloat16())
    with torch.no_grad():
        got = layer(x)
        unfolded = delta(x, lin(x), 1.0)
        merged = nn.functional.linear(x, lin.weight + delta.delta_weight(), lin.bias)
        a, b = delta.lora_A.weight, delta.lora_B.weight
        folded = reference.folded_linear(x, lin.weight, lin.bias, a, b, delta.scaling)
    assert torch.equal(got, folded) == folds or torch.equal(folded, unfolded)
    assert torch.equal(lin.weight, w0)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, unfolded, rtol=tol, atol=tol)
    torch.testing.assert_close(got, merged, rtol=tol, atol=tol)
    x.requires_grad_()
    assert type(layer(x).grad_fn).__name__ == "LinearLoRABackward"  # training never folds
