"""Grouped (multi-adapter) LoRA kernel (interpreter) against a per-adapter torch loop."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")
from conftest import DEVICE  # noqa: E402

from adapterlab.kernels import lora as K  # noqa: E402


def grouped(out, x, ids, As, Bs, scales):
    """The kernel on DEVICE, result back on the CPU."""
    to = lambda ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    return K.grouped_lora_add(out.to(DEVICE), x.to(DEVICE), ids.to(DEVICE), to(As), to(Bs), scales).cpu()


def reference(out, x, ids, As, Bs, scales):
    out = out.double().clone()
    for g, (a, b, s) in enumerate(zip(As, Bs, scales, strict=True)):
        rows = (ids == g).nonzero().flatten()
        out[rows] += s * x[rows].double() @ a.double().t() @ b.double().t()
    return out


@given(
    m=st.integers(1, 70),
    k=st.integers(1, 33),
    n=st.integers(1, 33),
    ranks=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    seed=st.integers(0, 999),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_grouped_matches_per_adapter_loop(m, k, n, ranks, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, len(ranks), (m,), generator=gen)  # unsorted, with -1 rows, maybe empty groups
    As = [torch.randn(r, k, generator=gen).to(dtype) for r in ranks]
    Bs = [torch.randn(n, r, generator=gen).to(dtype) / r for r in ranks]
    scales = [0.5 + g for g in range(len(ranks))]
    x, out = torch.randn(m, k, generator=gen).to(dtype), torch.randn(m, n, generator=gen).to(dtype)
    truth = reference(out, x, ids, As, Bs, scales)
    got = grouped(out.clone(), x, ids, As, Bs, scales)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.double(), truth, atol=tol * truth.abs().max().item() + tol)
    assert torch.equal(got[ids < 0], out[ids < 0])  # rows without an adapter are untouched


def test_all_rows_without_adapter_and_3d_input():
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    ids = torch.full((6,), -1)
    assert torch.equal(grouped(out.clone(), x, ids, [torch.ones(2, 4)], [torch.ones(5, 2)], [1.0]), out)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    As, Bs = [torch.randn(2, 4), torch.randn(3, 4)], [torch.randn(5, 2), torch.randn(5, 3)]
    got = grouped(out.clone(), x, ids, As, Bs, [1.0, 2.0])
    assert torch.allclose(
        got.view(6, 5).double(), reference(out.view(6, 5), x.view(6, 4), ids, As, Bs, [1.0, 2.0]), atol=1e-5
    )


def test_al_routing_takes_the_grouped_kernel_and_matches_the_torch_path(monkeypatch):
    from conftest import randomize_lora

    import adapterlab as al

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6))
    for name, r in (("a", 2), ("b", 5)):
        al.inject(model, "lora", name=name, r=r)
    randomize_lora(model)
    model.to(DEVICE)
    x = torch.randn(5, 3, 12, device=DEVICE)
    ids = ["b", None, "a", "a", "b"]
    calls = []
    real = K.grouped_lora_add
    monkeypatch.setattr(K, "grouped_lora_add", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        monkeypatch.setenv("ADAPTERLAB_BACKEND", "torch")
        with al.routing(model, ids):
            want = model(x)
        monkeypatch.setenv("ADAPTERLAB_BACKEND", "triton")
        with al.routing(model, ids):
            got = model(x)
    assert len(calls) == 2  # one grouped launch pair per adapted layer
    assert torch.allclose(got, want, atol=1e-5)
