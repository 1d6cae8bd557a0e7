"""The runnable examples (examples/*.py) with --tiny, each in its own subprocess.

All five runs start at once (each pays the torch / transformers import, seconds on a busy
machine) and the tests assert on what they printed (the last line is a JSON result) and wrote.
The examples check their own exports against the trained model and report the differences; the
tests bound those and read the written files' headers (no torch in the test process's way).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "lora": ["text_classification.py", "--method", "lora"],
    "sara": ["text_classification.py", "--method", "sara"],
    "ties": ["combine_ties.py"],
    "locft": ["locft_edit.py"],
    "unet": ["unet_finetune.py"],
}
NEEDS = {
    "lora": ["datasets", "peft"],
    "sara": ["datasets"],
    "ties": ["datasets"],
    "locft": [],
    "unet": ["diffusers", "peft"],
}
TOLERANCE = 1e-4  # largest logit difference allowed between an export and the trained model


def _missing(modules: list[str]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Start every runnable example with --tiny, wait for all; {name: {code, out, err, dir, result}}."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = {}
    for name, argv in RUNS.items():
        if _missing(NEEDS[name]):
            continue
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(ROOT / "examples" / argv[0]), *argv[1:], "--tiny", "--out", str(out)]
        started[name] = (
            out,
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out, env=env
            ),
        )
    done = {}
    for name, (out, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=600)
        lines = stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result = None
        done[name] = {"code": proc.returncode, "out": stdout, "err": stderr, "dir": out, "result": result}
    return done


def finished(runs: dict[str, dict], name: str) -> dict:
    """The run's JSON result, after checking it exited 0 and printed one."""
    missing = _missing(NEEDS[name])
    if missing:
        pytest.skip(f"the {name} example needs {missing} (pip install {' '.join(missing)})")
    run = runs[name]
    assert run["code"] == 0, f"exit {run['code']}\n{run['out'][-2000:]}\n{run['err'][-3000:]}"
    assert isinstance(run["result"], dict), f"the last line is not a JSON object:\n{run['out'][-1000:]}"
    return run["result"]


def header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes; `__metadata__`)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def is_fraction(x) -> bool:
    return isinstance(x, (int, float)) and 0.0 <= x <= 1.0


def checkpoint_keys(out: Path) -> list[str]:
    """Tensor names of the Trainer's checkpoint (the examples save one, at the end)."""
    (checkpoint,) = (out / "trainer").glob("checkpoint-*")
    return [k for k in header(checkpoint / "model.safetensors") if k != "__metadata__"]


def test_text_classification_lora_exports_a_peft_directory_that_matches(runs):
    result = finished(runs, "lora")
    assert is_fraction(result["accuracy_before"]) and is_fraction(result["accuracy_after"])
    # the trained adapter moved the logits, and peft's load of the export reproduces them
    assert result["adapter_max_logit_change"] > 1e-5
    assert 0 <= result["peft_max_abs_diff"] < TOLERANCE
    peft_dir = Path(result["peft_dir"])
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    keys = [k for k in header(peft_dir / "adapter_model.safetensors") if k != "__metadata__"]
    assert any(k.endswith("classifier.lora_B.weight") for k in keys)  # the head is part of the adapter
    assert all(k.startswith("base_model.model.") for k in keys)
    keys = checkpoint_keys(runs["lora"]["dir"])
    assert keys and all(".deltas." in k for k in keys)  # AdapterCallback: adapter-only checkpoint


def test_text_classification_sara_exports_a_dense_delta_that_matches(runs):
    result = finished(runs, "sara")
    assert is_fraction(result["accuracy_before"]) and is_fraction(result["accuracy_after"])
    assert result["adapter_max_logit_change"] > 1e-5
    assert 0 <= result["dense_max_abs_diff"] < TOLERANCE
    assert result["frozen_by_reselection"] > 0  # the progressive re-selection ran inside the Trainer
    dense = header(Path(result["dense_file"]))
    block = json.loads(dense.pop("__metadata__")["adapterlab"])
    assert block["method"] == "sara" and dense
    assert all(k.endswith(".weight") for k in dense)
    assert "classifier.weight" in dense


def test_combine_ties_writes_a_loadable_combination_and_scores_it(runs):
    result = finished(runs, "ties")
    table = result["accuracy"]
    assert set(table) == {"base", "sentiment", "topic", "stacked", "ties"}
    assert all(
        set(row) == {"sentiment", "topic"} and all(map(is_fraction, row.values())) for row in table.values()
    )
    combined = Path(result["combined_dir"])
    block = json.loads(header(combined / "adapter_model.safetensors")["__metadata__"]["adapterlab"])
    assert block["method"] == "dense"
    resolved = yaml.safe_load((combined / "combine.yaml").read_text())
    assert resolved["how"] == "ties" and set(resolved["adapters"]) == {"sentiment", "topic"}


def test_locft_edit_scores_and_merges_the_edit(runs):
    result = finished(runs, "locft")
    for when in ("before", "after"):
        assert set(result[when]) == {"reliability", "generalization", "locality"}
        assert all(map(is_fraction, result[when].values())), result[when]
    assert result["before"]["locality"] == 1.0  # no adapter yet: the model agrees with itself
    assert result["edit_steps"] >= 1
    # `adapterlab merge` wrote a checkpoint that decodes exactly as the model with the edit adapter
    assert result["merged_same_output"] == 1.0
    assert 0 <= result["merged_max_logit_diff"] < TOLERANCE
    assert (Path(result["merged_dir"]) / "config.json").is_file()


def test_unet_finetune_merges_lora_and_sara_into_a_diffusers_unet(runs):
    result = finished(runs, "unet")
    for method in ("lora", "sara"):
        r = result[method]
        assert r["steps"] >= 1 and r["trainable"] > 0
        assert r["loss_after"] < r["loss_before"]  # a few steps on the new pattern help
        assert r["adapter_max_change"] > 1e-4
        # `adapterlab merge` into the pipeline's unet/: from_pretrained gives the adapted outputs
        assert 0 <= r["merged_max_abs_diff"] < TOLERANCE
        merged = Path(r["merged_dir"])
        assert (merged / "diffusion_pytorch_model.safetensors").is_file() and (
            merged / "config.json"
        ).is_file()
    # LoRA in diffusers' own format, loaded by unet.load_lora_adapter: the same outputs
    assert 0 <= result["lora"]["diffusers_max_abs_diff"] < TOLERANCE
    meta = header(Path(result["lora"]["diffusers_dir"]) / "pytorch_lora_weights.safetensors")["__metadata__"]
    fields = json.loads(meta["lora_adapter_metadata"])
    assert fields["unet.r"] == 4 and fields["unet.lora_alpha"] == 8
