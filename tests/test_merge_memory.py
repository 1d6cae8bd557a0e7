"""fp16/bf16 merge keeps only what subtracting ΔW cannot undo: the entries that do not round back
(or a copy of the weight when that is fewer bytes). merge → unmerge stays bit-exact."""

import torch
from conftest import randomize_lora, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterlab as al
from adapterlab.layer import AdapterLayer


def bits(model: torch.nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        for k, v in model.state_dict().items()
    }


def record_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the merged layers keep to undo their merges, bytes of those layers' weights)."""
    kept = weights = 0
    for layer in model.modules():
        if isinstance(layer, AdapterLayer) and layer.merged:
            weights += layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
            for _, saved in layer._merges:
                kept += sum(
                    e.numel() * e.element_size() + (0 if w is None else w.numel() * w.element_size())
                    for w, e in saved
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
    assert kept <= 0.10 * weights
    al.unmerge(model)
    assert bits(model) == before
