"""The issue-#17 DSCLoRA reproduction (benchmarks/dsclora/plateau.py) in its --tiny configuration:
teacher and student start identical, so the distillation terms vanish at the first step; the
wrong-teacher control's affinity term is live; merged students keep the base's size; the paired
contrasts are the per-seed differences of the records."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterlab as al

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dsclora import plateau
from dsclora.model import SPAN, param_count

TINY = plateau.TINY


@pytest.fixture(scope="module")
def results() -> dict:
    return plateau.run(TINY, log=lambda _: None)


def test_every_variant_runs_every_seed_with_finite_numbers(results):
    assert set(results["psnr"]) == set(plateau.VARIANTS)
    for variant, recs in results["records"].items():
        assert len(recs) == len(TINY.seeds) == 3
        for r in recs:
            assert math.isfinite(r["psnr"]) and math.isfinite(r["affinity_to_teacher"]), variant
            assert r["weight_change"] > 0, variant  # every variant moved the network
    assert len(results["pretrain_curve"]) == TINY.pretrain_evals
    assert results["params"]["trainable"]["continued"] == results["params"]["base"]
    assert 0 < results["params"]["trainable"]["dsclora"] < results["params"]["base"] * 10


def test_distillation_terms_vanish_at_the_start(results):
    """Student = teacher at step 1 (ConvLoRA's B is zero), so pixel KD and affinity add nothing to the
    first loss, and every variant sees the same first batch: equal first losses."""
    rec = results["records"]
    for i in range(len(TINY.seeds)):
        first = rec["convlora"][i]["first_loss"]
        for variant in ("continued", "convlora_pixel", "convlora_affinity", "dsclora"):
            assert rec[variant][i]["first_loss"] == pytest.approx(first, rel=1e-6, abs=1e-9), variant
        # the control's affinity target is another net: its first loss carries a positive affinity term
        assert rec["dsclora_wrong_teacher"][i]["first_loss"] > first + 1e-4


def test_contrasts_are_the_paired_per_seed_differences(results):
    rec, base = results["records"], results["fixed_psnr"]["plateau_base"]["mean"]
    for name, a, b in plateau.CONTRASTS:
        got = results["contrasts"][name]
        want = [r["psnr"] - (base if b is None else rec[b][i]["psnr"]) for i, r in enumerate(rec[a])]
        assert got["per_seed"] == pytest.approx(want)
        assert got["mean"] == pytest.approx(statistics.mean(want))
        assert got["min"] <= got["mean"] <= got["max"]


def test_merged_student_is_the_plain_base(results):
    merge = results["merge"]
    assert merge["merged_params"] == merge["base_params"] == param_count(SPAN(TINY.channels, TINY.blocks))
    assert merge["unmerged_params"] > merge["base_params"]
    assert merge["same_modules_as_base"]
    assert merge["merged_vs_unmerged_max_abs"] < 1e-5


def test_affinity_term_reaches_the_spab_adapters():
    """The control's loss has a gradient on the SPAB adapters once B ≠ 0; with the teacher itself as
    the affinity target and no pixel terms, a student equal to the teacher gets none."""
    torch.manual_seed(0)
    teacher = SPAN(TINY.channels, TINY.blocks, TINY.scale).eval().requires_grad_(False)
    wrong = SPAN(TINY.channels, TINY.blocks, TINY.scale).eval().requires_grad_(False)
    lr = torch.rand(2, 3, 8, 8)
    hr = torch.rand(2, 3, 16, 16)
    for target, expect_grad in ((wrong, True), (teacher, False)):
        student = plateau.make_student("dsclora", teacher, seed=0)
        plateau.dsclora_loss(teacher, (0.0, 0.0, 0.08), target)(student, lr, hr).backward()
        grads = [p.grad for n, p in student.named_parameters() if n.startswith("blocks.") and "lora_B" in n]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads) == expect_grad


def test_tiny_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    plateau.main(["--tiny", "--seeds", "0", "--tune-steps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["setup"]["seeds"] == [0] and saved["setup"]["tune_steps"] == 1
    assert saved["command"].endswith("--out " + str(out))


def test_unknown_variant_is_refused_before_training():
    setup = plateau.Setup(variants=("dsclora", "dslora"), images="synthetic")
    with pytest.raises(al.ConfigError, match="dslora"):
        plateau.run(setup, log=lambda _: None)


@settings(max_examples=30, deadline=None)
@given(
    a=st.lists(st.floats(30, 40), min_size=1, max_size=5),
    shift=st.floats(-1, 1),
    base=st.floats(30, 40),
)
def test_contrast_of_a_shifted_variant_is_the_shift(a, shift, base):
    records = {
        "dsclora": [{"psnr": x + shift} for x in a],
        "convlora_pixel": [{"psnr": x} for x in a],
    }
    out = plateau.contrasts(records, base)
    assert set(out) == {"dsclora_vs_base", "affinity_effect"}  # only contrasts whose variants ran
    assert out["affinity_effect"]["mean"] == pytest.approx(shift, abs=1e-9)
    assert out["affinity_effect"]["std"] == pytest.approx(0, abs=1e-9)
    assert out["dsclora_vs_base"]["mean"] == pytest.approx(statistics.mean(a) + shift - base, abs=1e-9)
