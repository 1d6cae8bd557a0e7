"""The LT-SFT transfer reproduction (benchmarks/sft_transfer.py) in its tiny configuration: it runs
end to end, its controls hold (merged = unmerged, base restored), and its data are what the
docstring says (disjoint vocabularies, one label per sentence, the pre-training mix)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sft_transfer as bench

import adapterlab as al


@pytest.fixture(scope="module")
def result() -> dict:
    return bench.run(bench.Setup.tiny(), log=lambda _: None)


def test_tiny_run_reports_every_setting_and_its_controls_hold(result):
    summary = result["summary"]
    assert set(bench.SETTINGS) <= set(summary)
    for row in summary.values():
        assert 0.0 <= row["mean"] <= 1.0 and len(row["per_seed"]) == 1
    (run,) = result["runs"]
    controls = run["controls"]
    assert controls["base restored bit for bit after unmerge"] is True
    assert controls["B: langB + task, merged"] == run["accuracy"]["B: langB + task"]
    assert 0 < result["k"] == round(bench.Setup.tiny().density * result["maskable"])


def test_languages_share_meaning_but_not_tokens():
    s = bench.Setup.tiny()
    world = bench.World(s, seed=0)
    concepts = world.concepts(5)
    a, b = world.render(concepts, "A"), world.render(concepts, "B")
    assert set(a.flatten().tolist()).isdisjoint(b.flatten().tolist())
    assert a.max() < 1 + s.concepts <= b.min() and b.max() < 1 + 2 * s.concepts
    ids, label = world.task("B", 1)[0]
    assert ids.shape == (s.batch, s.length) and label.shape == (s.batch,)
    assert set(label.tolist()) <= {0, 1}


def test_plot_writes_a_png(result, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import plots

    monkeypatch.setattr(plots, "OUT", tmp_path)
    plots.sft_transfer(result)
    assert (tmp_path / "sft_transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_mask_task_trains_exactly_k_entries():
    s = bench.Setup.tiny()
    world = bench.World(s, seed=1)
    model = bench.pretrain(world, s, seed=1)
    al.inject(model, "sft", targets=bench.BODY, name="langA")  # empty supports: ΔW = 0
    bench.random_mask_task(model, 17, world.task("A", 2), s, seed=1)
    k = sum(layer.deltas["random"].k for _, layer in bench.adapter_layers(model) if "random" in layer.deltas)
    assert k == 17
    assert float(model.head.deltas["random_head"].weight_delta.abs().sum()) > 0
    assert all(not p.requires_grad for p in model.parameters())
