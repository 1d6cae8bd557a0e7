"""fp16/bf16 merge keeps only what subtracting ΔW cannot undo (rounding.py: k-bit codes where k
binades were lost, exceptions for the rest, or a copy of the weight when that is fewer bytes).
merge → unmerge stays bit-exact."""

import pytest
import torch
from conftest import randomize_lora, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterlab as al
from adapterlab import rounding
from adapterlab.layer import AdapterLayer


def bits(model: torch.nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        for k, v in model.state_dict().items()
    }


def record_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the merged layers keep to undo their merges, bytes of those layers' weights)."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.merged]
    kept = sum(layer.merge_record_bytes() for layer in layers)
    weights = sum(
        layer.base_layer.weight.numel() * layer.base_layer.weight.element_size() for layer in layers
    )
    return kept, weights


@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    std=st.sampled_from([1e-4, 1e-2, 0.2, 3.0]),
    separate=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=25, deadline=None)
def test_half_precision_merge_unmerge_is_bit_exact(dtype, std, separate, seed):
    torch.manual_seed(seed)
    model = tiny_llama(layers=1).to(dtype)
    al.inject(model, "lora", r=4, name="a", targets=["q_proj", "down_proj"])
    al.inject(model, "lora", r=2, name="b", targets=["q_proj"])
    randomize_lora(model, std=std)
    with torch.no_grad():  # signed zeros must come back as they were
        model.model.layers[0].self_attn.q_proj.base_layer.weight[0, :4] = -0.0
    before = bits(model)
    if separate:  # two merge calls, undone last-first
        al.merge(model, ["a"])
        al.merge(model, ["b"])
    else:
        al.merge(model)
    kept, weights = record_bytes(model)
    calls = 2 if separate else 1
    assert kept <= calls * weights  # per merge call, never more than a copy of the weights
    al.unmerge(model)
    assert bits(model) == before


def test_a_small_update_keeps_a_small_record():
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=64).to(torch.bfloat16)
    al.inject(model, "lora", r=8, targets="all-linear")
    randomize_lora(model, std=0.01)  # ΔW of a few percent of W, as after fine-tuning
    before = bits(model)
    al.merge(model)
    kept, weights = record_bytes(model)
    print(f"\nbf16 merge keeps {kept} bytes for {weights} bytes of merged weights ({kept / weights:.3f}x)")
    assert kept <= 0.03 * weights  # 0.007x (positions + values kept 0.089x)
    al.unmerge(model)
    assert bits(model) == before


HALF = st.sampled_from([torch.bfloat16, torch.float16])


def patterns(dtype: torch.dtype, raw: list[int]) -> torch.Tensor:
    """fp16/bf16 entries from 16-bit patterns: any value, subnormals, ±0, ±inf and NaNs included."""
    return torch.tensor([r - 65536 if r > 32767 else r for r in raw], dtype=torch.int16).view(dtype)


def merge_and_undo(before: torch.Tensor, changes: list[torch.Tensor], chunk: int) -> rounding.RoundingRecord:
    """merge_ → unmerge_ on a copy of `before`; asserts the merged and restored bits."""
    weight = before.clone()
    record = rounding.merge_(weight, changes, chunk)
    total = before.to(torch.float32)
    for c in changes:
        total = total + c
    expected = total.to(before.dtype)  # NaN payloads may differ between kernels; NaN stays NaN
    same = (weight.view(torch.int16) == expected.view(torch.int16)) | (weight.isnan() & expected.isnan())
    assert bool(same.all())
    change = torch.zeros_like(changes[0])
    for c in changes:
        change += c
    rounding.unmerge_(weight, change, record)
    assert torch.equal(weight.view(torch.int16), before.view(torch.int16))
    return record


@given(
    dtype=HALF,
    raw=st.lists(st.integers(0, 65535), min_size=1, max_size=300),
    scale=st.sampled_from([1e-8, 1e-4, 1e-2, 1.0, 1e3, 1e6]),
    calls=st.integers(1, 2),
    chunk=st.sampled_from([1, 7, 64, rounding.CHUNK]),
    specials=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=200, deadline=None)
def test_the_record_restores_any_bit_pattern(dtype, raw, scale, calls, chunk, specials, seed):
    """Whatever the entries (subnormals, ±0, inf, NaN) and the change (scale, inf/NaN, one or
    two adapters), merge_ writes the rounded sum and unmerge_ gives every bit back."""
    gen = torch.Generator().manual_seed(seed)
    before = patterns(dtype, raw)
    changes = [torch.randn(before.shape, generator=gen) * scale for _ in range(calls)]
    if specials:
        changes[0][::5] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])[
            torch.arange(len(changes[0][::5])) % 4
        ]
    merge_and_undo(before, changes, chunk)


@given(dtype=HALF, lost=st.integers(1, 20), chunk=st.sampled_from([5, 1000]), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_every_entry_losing_bits_is_restored(dtype, lost, chunk, seed):
    """A change 2^lost times the entries: every entry fails to round back, by up to 2^lost ulps
    (long codes, exceptions past MAX_CODE, or the copy when that is smaller)."""
    gen = torch.Generator().manual_seed(seed)
    before = (torch.rand(1000, generator=gen) + 0.5).to(dtype)
    change = (torch.rand(1000, generator=gen) + 1.0) * 2.0**lost
    weight = before.clone()
    weight.copy_((weight.float() + change).to(dtype))
    back = (weight.float() - change).to(dtype)
    assert (back.view(torch.int16) != before.view(torch.int16)).float().mean() > 0.3
    merge_and_undo(before, [change], chunk)


def test_offsets_of_several_ulps_are_coded_not_copied():
    """Entries a few binades below their merged value lose a few bits each: the record codes them
    in that many bits, far below the 6 bytes of a (position, value) exception."""
    gen = torch.Generator().manual_seed(0)
    before = (torch.randn(20000, generator=gen) * 0.02).to(torch.bfloat16)
    change = torch.randn(20000, generator=gen) * 0.08  # |ΔW| ≈ 4|W|: ~2 bits lost per entry
    record = merge_and_undo(before, [change], rounding.CHUNK)
    assert record.copy is None
    assert record.where.numel() < 0.02 * before.numel()
    assert record.nbytes() <= 0.5 * before.numel() * before.element_size()


@given(seed=st.integers(0, 1000), scale=st.sampled_from([1e-7, 1e-6, 1e-5]))
@settings(max_examples=30, deadline=None)
def test_fp16_subnormals_are_restored(seed, scale):
    """fp16 subnormals (below 6.1e-5: fixed ulp 2^-24) merged with changes around that size."""
    gen = torch.Generator().manual_seed(seed)
    before = (torch.randn(2000, generator=gen) * 3e-5).to(torch.float16)
    assert (before.abs() < 6.1e-5).float().mean() > 0.5
    merge_and_undo(before, [torch.randn(2000, generator=gen) * scale], 300)


def test_a_non_contiguous_half_weight_merges_and_restores():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    model[0].weight = torch.nn.Parameter(torch.randn(16, 8).t().to(torch.bfloat16))  # (8, 16), strided
    model[0].bias = torch.nn.Parameter(model[0].bias.detach().to(torch.bfloat16))
    al.inject(model, "lora", r=2, targets=["0"])
    randomize_lora(model, std=0.3)
    before = model[0].base_layer.weight.detach().clone()
    expected = model[0].merged_weight({"default": 1.0})
    al.merge(model)
    assert torch.equal(model[0].base_layer.weight.view(torch.int16), expected.view(torch.int16))
    al.unmerge(model)
    assert torch.equal(model[0].base_layer.weight.view(torch.int16), before.view(torch.int16))


def calls_to_delta_weight(model: torch.nn.Module) -> dict[str, int]:
    """Count each delta's `delta_weight` calls (instance attributes shadow the method)."""
    counts: dict[str, int] = {}
    for path, layer in al.model.adapter_layers(model):
        for name, delta in layer.deltas.items():
            key, inner = f"{path}/{name}", delta.delta_weight

            def counted(key=key, inner=inner):
                counts[key] = counts.get(key, 0) + 1
                return inner()

            delta.delta_weight = counted
            counts[key] = 0
    return counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_safe_merge_computes_each_delta_once_and_a_nan_undoes_every_layer_exactly(dtype):
    torch.manual_seed(0)
    model = tiny_llama(layers=2).to(dtype)
    al.inject(model, "lora", r=4, targets="all-linear")
    randomize_lora(model, std=0.2)
    before = bits(model)
    counts = calls_to_delta_weight(model)
    al.merge(model)  # safe=True by default
    assert counts and set(counts.values()) == {1}
    al.unmerge(model)
    assert bits(model) == before
    last = [layer for _, layer in al.model.adapter_layers(model)][-1]
    with torch.no_grad():
        last.deltas["default"].lora_B.weight[0, 0] = float("nan")
    before = bits(model)
    with pytest.raises(al.MergeError, match=r"NaN/Inf; nothing was merged"):
        al.merge(model)
    assert bits(model) == before  # the layers merged before the bad one went back bit for bit
    assert not any(layer.merged for _, layer in al.model.adapter_layers(model))
