"""The HFT and SaRA reproductions (benchmarks/hft_forgetting.py, hft_minilm.py, sara_digits.py) in
their --tiny configurations, and the controls built into them: SaRA leaves every entry outside its
mask alone and, at density 1, takes full fine-tuning's steps; a dense ΔW on every module HFT draws
from takes the steps of fine-tuning those modules directly; HFT trains about half of the layers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hft_forgetting as hft_toy  # noqa: E402
import sara_digits  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sara_result() -> dict:
    pytest.importorskip("sklearn")
    return sara_digits.run(sara_digits.TINY, log=lambda _: None)


@pytest.fixture(scope="module")
def hft_result() -> dict:
    return hft_toy.run(hft_toy.TINY, log=lambda _: None)


def test_sara_moves_nothing_outside_its_mask(sara_result):
    assert sara_result["summary"]["max_change_outside_mask"] == 0.0
    moved = sara_result["seeds"][0]["rank"][0]["hidden_dw"]["nuclear"]
    assert moved > 0  # and it did train inside it


def test_sara_at_density_one_takes_full_fine_tunings_steps(sara_result):
    runs = sara_result["seeds"][0]["finetune"]
    dense, full = runs["sara_dense"], runs["full_weights"]
    assert dense["final_loss"] < dense["L0"]  # it learned
    assert math.isclose(dense["final_loss"], full["final_loss"], rel_tol=1e-4)
    assert dense["new"] == full["new"] and dense["old"] == full["old"]


def test_sara_nuclear_weight_is_relative_to_the_initial_loss(sara_result):
    for r in sara_result["seeds"][0]["rank"]:
        assert math.isclose(r["lambda"], r["lambda_rel"] * r["L0"])
    base, strong = sara_result["seeds"][0]["rank"][0], sara_result["seeds"][0]["rank"][-1]
    assert strong["hidden_dw"]["nuclear"] < base["hidden_dw"]["nuclear"]


def test_pruning_the_largest_entries_hurts_more_than_the_smallest(sara_result):
    prune = sara_result["seeds"][0]["prune"]
    assert set(prune) == {"smallest", "random", "largest"}
    assert prune["largest"]["0.1"] <= prune["smallest"]["0.1"]


def test_effective_rank_of_known_matrices():
    u = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))[0]
    r2 = u[:, :2] @ torch.diag(torch.tensor([3.0, 3.0], dtype=torch.float64)) @ u[:, 2:4].T
    got = sara_digits.effective_rank(r2)
    assert got["rank_1pct"] == 2 and math.isclose(got["erank"], 2.0, rel_tol=1e-6)
    assert math.isclose(got["nuclear"], 6.0, rel_tol=1e-6)
    assert sara_digits.effective_rank(torch.zeros(4, 4))["erank"] == 0.0


def test_hft_control_tracks_direct_fine_tuning(hft_result):
    runs = hft_result["records"][0]["runs"]
    a, b = runs["dense_layers"]["curve"], runs["full_layers"]["curve"]
    assert runs["dense_layers"]["trainable"] == runs["full_layers"]["trainable"]
    assert a.keys() == b.keys()
    for step in a:
        assert max(abs(x - y) for x, y in zip(a[step], b[step], strict=True)) <= 0.02


def test_hft_trains_about_half_of_the_layers(hft_result):
    s = hft_result["summary"]
    ratio = s["hft"]["trainable"] / s["full_layers"]["trainable"]
    assert 0.4 < ratio < 0.6
    assert hft_result["step_ratio_hft_vs_full"] > 0


def test_retention_is_read_at_the_first_step_reaching_each_target():
    pre_old = 0.8
    curve = {0: [0.8] * 4 + [0.0], 3: [0.4] * 4 + [0.6], 6: [0.2] * 4 + [0.85], 9: [0.2] * 4 + [0.97]}
    got = hft_toy.at_targets(curve, pre_old)
    assert got["0.5"]["step"] == 3 and math.isclose(got["0.5"]["retention"], 0.5)
    assert got["0.8"]["step"] == 6 and math.isclose(got["0.8"]["retention"], 0.25)
    assert got["0.95"]["step"] == 9 and got["end"]["step"] == 9
    assert hft_toy.at_targets({0: [0.8] * 4 + [0.1]}, pre_old)["0.5"] is None


def test_hft_minilm_tiny_runs(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import hft_minilm

    result = hft_minilm.run(hft_minilm.TINY, log=lambda _: None)
    s = result["summary"]
    head = 32 * 2 + 2  # the new head trains in every variant
    assert s["hft"]["trainable"] > head
    assert s["hft"]["trainable"] < s["full_layers"]["trainable"] < s["full"]["trainable"]
    for v in hft_minilm.VARIANTS:
        assert math.isfinite(s[v]["end"]["retention"]["mean"])
    if importlib.util.find_spec("matplotlib"):
        import plots

        monkeypatch.setattr(plots, "OUT", tmp_path)
        plots.hft_minilm(result)
        assert (tmp_path / "hft_minilm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_draw_the_tiny_results(sara_result, hft_result, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import plots

    monkeypatch.setattr(plots, "OUT", tmp_path)
    plots.sara_digits(sara_result)
    plots.hft_forgetting(hft_result)
    for name in ("sara_digits", "hft_forgetting"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
