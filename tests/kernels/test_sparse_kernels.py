"""Triton sparse kernels (interpreter) against plain torch: apply (unique and duplicate indices)
and the sampled gradient, fp32 and fp16, odd shapes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")
from conftest import DEVICE  # noqa: E402

from adapterlab.kernels import sparse as S  # noqa: E402


@given(
    n_rows=st.integers(1, 40),
    n_cols=st.integers(1, 40),
    frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 99),
)
def test_apply_sorted_unique_matches_index_add(n_rows, n_cols, frac, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_rows, n_cols, generator=gen).to(dtype)
    k = int(frac * w.numel())
    idx = torch.randperm(w.numel(), generator=gen)[:k].sort().values.to(torch.int32)
    vals = torch.randn(k, generator=gen)
    want = w.float().view(-1).index_add(0, idx.long(), vals * 0.5).view_as(w).to(dtype)
    got = S.sparse_apply(w.clone().to(DEVICE), idx.to(DEVICE), vals.to(DEVICE), alpha=0.5).cpu()
    assert torch.allclose(got.float(), want.float(), atol=2e-3 if dtype == torch.float16 else 1e-6)


def test_apply_with_duplicate_indices_uses_atomics():
    w = torch.zeros(4, 5)
    idx = torch.tensor([3, 3, 3, 7, 19, 7], dtype=torch.int64)
    vals = torch.ones(6)
    got = S.sparse_apply(w.clone().to(DEVICE), idx.to(DEVICE), vals.to(DEVICE), unique=False).cpu()
    assert torch.equal(got.view(-1), torch.zeros(20).index_add(0, idx, vals))
    assert (
        S.sparse_apply(w.clone().to(DEVICE), idx[:0].to(DEVICE), vals[:0].to(DEVICE)).abs().sum() == 0
    )  # no-op


@pytest.mark.parametrize("t,n_out,n_in,k", [(1, 1, 1, 1), (17, 13, 31, 40), (129, 7, 5, 35), (33, 64, 64, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sampled_grad_matches_dense_then_gather(t, n_out, n_in, k, dtype):
    gen = torch.Generator().manual_seed(t + k)
    dy = torch.randn(t, n_out, generator=gen, dtype=torch.float64)
    x = torch.randn(t, n_in, generator=gen, dtype=torch.float64)
    flat = torch.randperm(n_out * n_in, generator=gen)[:k].sort().values
    rows, cols = flat // n_in, flat % n_in
    truth = (dy.t() @ x).view(-1)[flat]
    got = S.sampled_grad(
        dy.to(DEVICE, dtype), x.to(DEVICE, dtype), rows.to(DEVICE), cols.to(DEVICE), out_dtype=torch.float32
    ).cpu()
    plain = (dy.to(dtype).float().t() @ x.to(dtype).float()).view(-1)[flat]  # the yardstick, same inputs
    err = (got.double() - truth).abs().max().item()
    assert err <= 2 * (plain.double() - truth).abs().max().item() + 1e-5 * truth.abs().max().item()


def test_sampled_grad_of_strided_views():
    gen = torch.Generator().manual_seed(0)
    dy_t = torch.randn(9, 20, generator=gen)  # stored transposed: dy = dy_t.t() is (20, 9)
    x = torch.randn(20, 6, generator=gen)
    rows, cols = torch.tensor([0, 4, 8]), torch.tensor([5, 0, 3])
    got = S.sampled_grad(dy_t.to(DEVICE).t(), x.to(DEVICE), rows.to(DEVICE), cols.to(DEVICE)).cpu()
    assert torch.allclose(got, (dy_t @ x)[rows, cols], atol=1e-5)
