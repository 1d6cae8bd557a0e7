"""The DSCLoRA reproduction (benchmarks/dsclora) in a tiny configuration, and the invariants of its
ConvLoRA placement: merged students keep the base's size and the unmerged output; ConvLoRA
training leaves the base weights alone; the kernel layout spends the reshape layout's budget."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterlab as al

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dsclora import data
from dsclora import run as dsc
from dsclora.model import (
    SPAN,
    dsclora_placement,
    inject_convlora,
    kernel_placement,
    lora_params,
    param_count,
    trainable,
)

TINY = dsc.Setup(
    teacher_channels=8,
    student_channels=4,
    blocks=2,
    patch=16,
    batch=2,
    teacher_steps=3,
    base_steps=2,
    tune_steps=3,
    seeds=(0,),
    variants=("reshape_kd", "kernel_kd"),
    eval_side=32,
    curve_points=1,
    latency_side=16,
    latency_rounds=2,
    images="synthetic",
)


def expected_budget(model: SPAN, placement) -> int:
    """Σ over the targeted convs of the layout's parameter formula (independent of the library)."""
    spab = [b.get_submodule(c) for b in model.blocks for c in ("c1", "c2", "c3")]
    return sum(lora_params(placement.mode, conv, placement.spab) for conv in spab) + sum(
        lora_params(placement.mode, model.get_submodule(path), r) for path, r in placement.tail
    )


@pytest.fixture(scope="module")
def results() -> dict:
    return dsc.run(TINY, log=lambda _: None)


def test_merged_student_has_the_base_size_and_the_unmerged_output(results):
    base_params = param_count(SPAN(TINY.student_channels, TINY.blocks, TINY.scale))
    assert set(results["merge"]) == {"reshape_kd", "kernel_kd"}
    for check in results["merge"].values():
        assert check["merged_params"] == check["base_params"] == base_params
        assert check["unmerged_params"] > base_params
        assert check["same_modules_as_base"]
        assert check["merged_vs_unmerged_max_abs"] < 1e-5


def test_run_reports_finite_psnr_budgets_and_latency(results):
    base = SPAN(TINY.student_channels, TINY.blocks, TINY.scale)
    assert results["params"]["trainable"]["reshape_kd"] == expected_budget(base, dsclora_placement("reshape"))
    assert results["params"]["trainable"]["kernel_kd"] == expected_budget(base, kernel_placement(base))
    for variant in TINY.variants:
        assert math.isfinite(results["psnr"][variant]["mean"])
        assert len(results["records"][variant][0]["curve"]) == TINY.curve_points + 1
    for key in ("teacher", "student_base", "bicubic"):
        assert math.isfinite(results["fixed_psnr"][key]["mean"])
    assert all(r > 0 for r in results["latency"]["median_ratio_vs_student_base"].values())
    balance = results["gradient_balance"]["ad_over_rec"]
    assert 0 < balance["min"] <= balance["median"] <= balance["max"] < math.inf


def test_convlora_tuning_moves_only_the_adapters():
    train, test = dsc.load_images(TINY)
    pairs = data.eval_pairs(test, TINY.scale, TINY.eval_side)
    teacher = dsc.pretrain(TINY.teacher_channels, 1, TINY, train, seed=0)
    base = dsc.pretrain(TINY.student_channels, 1, TINY, train, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    student, _ = dsc.tune("reshape_kd", base, teacher, TINY, train, pairs, seed=0)
    state = student.state_dict()
    for key, value in before.items():  # base weights: unchanged in the base and in the student
        assert torch.equal(base.state_dict()[key], value)
        wrapped = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        assert torch.equal(state.get(key, state.get(wrapped)), value), key
    moved = [k for k, v in state.items() if "lora_B" in k and v.abs().sum() > 0]
    assert len(moved) == 3 * TINY.blocks + 2  # every adapted conv's B left zero


@settings(max_examples=12, deadline=None)
@given(
    channels=st.integers(2, 10),
    blocks=st.integers(1, 2),
    scale=st.sampled_from([2, 3]),
    mode=st.sampled_from(["reshape", "kernel"]),
    seed=st.integers(0, 2**16),
)
def test_placement_merges_exactly_and_matches_the_budget(channels, blocks, scale, mode, seed):
    torch.manual_seed(seed)
    base = SPAN(channels, blocks, scale)
    placement = dsclora_placement("reshape") if mode == "reshape" else kernel_placement(base)
    model = inject_convlora(copy.deepcopy(base), placement)
    assert trainable(model) == expected_budget(base, placement)
    if (
        mode == "kernel"
    ):  # nearest integer rank: within half a rank's parameters of the reshape budget, per conv
        ref = dsclora_placement("reshape")
        convs = [(base.blocks[0].c1, placement.spab, ref.spab)] + [
            (base.get_submodule(p), r, r_ref)
            for (p, r), (_, r_ref) in zip(placement.tail, ref.tail, strict=True)
        ]
        for conv, r, r_ref in convs:
            gap = abs(lora_params("kernel", conv, r) - lora_params("reshape", conv, r_ref))
            assert gap <= lora_params("kernel", conv, 1) / 2 or r == 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        x = torch.rand(1, 3, 7, 9)
        unmerged = model(x)
        with al.disabled(model):
            assert not torch.allclose(model(x), unmerged, atol=1e-6)
        merged = al.unload(model, merge=True)
        assert param_count(merged) == param_count(base)
        torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=1e-5)


def test_data_pairs_sampler_and_psnr():
    images = data.synthetic_images(2, 40, seed=3)
    a = data.PatchSampler(images, 12, 3, 4, seed=5).next()
    b = data.PatchSampler(images, 12, 3, 4, seed=5).next()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (4, 3, 4, 4) and a[1].shape == (4, 3, 12, 12)
    for lr, hr in data.eval_pairs(images, 3, 32):
        assert hr.shape[-1] % 3 == 0 and lr.shape[-1] * 3 == hr.shape[-1]
    hr = (images[0][None] * 255).round() / 255  # 8-bit, as the SR is rounded to 8 bits
    assert data.psnr_y(hr, hr, shave=2) == math.inf
    assert data.psnr_y((hr + 0.05).clamp(0, 1), hr, shave=2) < data.psnr_y(
        (hr + 0.01).clamp(0, 1), hr, shave=2
    )
    with pytest.raises(al.ConfigError, match="multiple of scale"):
        data.PatchSampler(images, 13, 3, 4, seed=0)


def test_plot_writes_a_png(results, tmp_path):
    pytest.importorskip("matplotlib")
    dsc.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
