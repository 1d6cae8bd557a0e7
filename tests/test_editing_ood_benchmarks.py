"""The LocFT and LEVI reproductions (benchmarks/locft_editing.py, benchmarks/levi_ood.py) in their
--tiny configurations: they run end to end, their controls hold, their task splits are what the
docs say, and their plots draw from the results they write."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import levi_ood
import locft_editing

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def locft() -> dict:
    threads = torch.get_num_threads()
    try:
        return locft_editing.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def levi() -> dict:
    threads = torch.get_num_threads()
    try:
        return levi_ood.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)


def test_locft_tiny_runs_every_layer_and_strategy(locft):
    s = locft["setup"]
    assert {(r["layer"], r["strategy"]) for r in locft["rows"]} == {
        (layer, strategy) for layer in range(s["layers"]) for strategy in ("breadth_first", "depth_first")
    }
    for r in locft["rows"]:
        for key in ("reliability", "generalization", "locality_same_subject", "locality_other_subjects"):
            assert 0.0 <= r[key] <= 1.0
        assert r["ppl_held_out"] >= 1.0 and r["steps"] + r["skipped"] > 0
    assert len(locft["summary"]) == len(locft["rows"])  # one seed: one row per cell


def test_locft_control_disabling_the_edit_restores_the_old_facts(locft):
    """The edit lives only in its delta: switched off, the model knows exactly what it knew before."""
    before = {(c["seed"], c["edits"]): c["old_facts_known"] for c in locft["controls_before_editing"]}
    for r in locft["rows"]:
        assert r["control_old_facts_with_edit_disabled"] == before[(r["seed"], r["edits"])]


def test_locft_edit_requests_change_every_fact_and_keep_locality_apart():
    s = locft_editing.TINY
    city = [i % s.cities for i in range(s.subjects)]
    job = [i % s.jobs for i in range(s.subjects)]
    edited, others = [0, 1, 2], [10, 11, 12]
    for r, subj, other in zip(
        locft_editing.edit_requests(s, city, job, edited, others, seed=0), edited, others, strict=True
    ):
        assert r["prompt"] == f"s{subj} lives in" and r["target"] != f"c{city[subj]}"
        assert all(f"s{subj}" in p for p in r["paraphrases"]) and len(r["paraphrases"]) == 2
        assert r["locality"] == [f"s{subj} works as", f"s{other} lives in"]


def test_levi_tiny_runs_every_method_and_split(levi):
    assert set(levi["runs"]) == set(levi_ood.METHODS)
    for runs in levi["runs"].values():
        assert len(runs) == len(levi["seeds"])
        for split in ("id", "ood", "unseen_words", "flipped_day"):
            assert all(0.0 <= r[split] <= 1.0 for r in runs)


def test_levi_splits_shift_what_the_docs_say():
    train_words = {w for ws in levi_ood.TRAIN_WORDS.values() for w in ws}
    ood_words = {w for ws in levi_ood.OOD_WORDS.values() for w in ws}
    assert not train_words & ood_words  # OOD words are never seen in fine-tuning
    data = levi_ood.splits(4000, 4000)

    def agreement(rows):
        return sum((levi_ood.DAYS[y] in text) for text, y in rows) / len(rows)

    assert agreement(data["train"]) == pytest.approx(0.95, abs=0.015)
    assert agreement(data["id"]) == pytest.approx(0.95, abs=0.015)
    assert agreement(data["ood"]) == 0.0 and agreement(data["flipped_day"]) == 0.0
    assert agreement(data["unseen_words"]) == pytest.approx(0.5, abs=0.03)
    for text, y in random.Random(0).sample(data["ood"], 50):  # the adjective carries the label
        assert text.split()[-2] in levi_ood.OOD_WORDS[y]
    assert {t.split()[-2] for t, _ in data["train"]} <= train_words


def test_plots_draw_from_the_tiny_results(locft, levi, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import plots

    monkeypatch.setattr(plots, "OUT", tmp_path)
    plots.locft_editing(locft)
    plots.levi_ood(levi)
    assert (tmp_path / "locft_editing.png").stat().st_size > 0
    assert (tmp_path / "levi_ood.png").stat().st_size > 0
