"""AdapterCallback with a plain transformers.Trainer: schedules, adapter-only checkpoints, exact resume."""

import logging

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import adapterlab as al
from adapterlab.integrations import AdapterCallback
from adapterlab.methods.sft import PhasedDelta
from adapterlab.methods.sparse import SparseDelta

METHODS = {
    "lora": dict(method="lora", r=4, alpha=8),
    "sara": dict(method="sara", density=0.05, progressive_step=2, nuclear_min_dim=8, nuclear_weight=1e-2),
    "sft": dict(method="sft", density=0.02, full_steps=3),
    "hft": dict(method="hft", seed=0, stage_steps=2),
}


def data(n=24, seq=12):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (n, seq), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def model_with(method):
    model = tiny_llama()
    options = dict(METHODS[method])
    al.inject(model, options.pop("method"), **options)
    return model


def train(model, out, steps, resume=None, save_steps=2):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=save_steps,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data(), callbacks=[AdapterCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." in k}


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_from_a_checkpoint_gives_the_uninterrupted_adapter(method, tmp_path):
    straight = model_with(method)
    before = adapter_state(straight)
    train(straight, tmp_path / "a", steps=6)
    want = adapter_state(straight)
    assert any(k not in before or not torch.equal(want[k], before[k]) for k in want)  # it trained

    checkpoint = tmp_path / "a" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".deltas." in k for k in keys)  # adapter tensors only, no base weights
    al.load(tiny_llama(), checkpoint)  # the checkpoint is a loadable adapter directory too (PEFT layout)

    resumed = model_with(method)
    train(resumed, tmp_path / "b", steps=6, resume=str(checkpoint))
    got = adapter_state(resumed)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_sara_schedule_reselects_and_adds_the_nuclear_norm_gradient(tmp_path):
    model = model_with("sara")
    train(model, tmp_path, steps=4, save_steps=100)
    deltas = [layer.deltas["default"] for _, layer in al.model.adapter_layers(model)]
    assert any(d.frozen.any() for d in deltas)  # progressive_step=2 froze some entries
    assert all(d.trained < d.k for d in deltas if d.frozen.any())


def test_sft_schedule_selects_k_entries_and_finishes_sparse(tmp_path, caplog):
    model = model_with("sft")
    with caplog.at_level(logging.INFO, logger="adapterlab"):
        train(model, tmp_path, steps=5, save_steps=100)
    assert any("trainable params" in r.getMessage() for r in caplog.records)
    deltas = [layer.deltas["default"] for _, layer in al.model.adapter_layers(model)]
    assert all(isinstance(d, SparseDelta) for d in deltas)
    total = sum(d.numel for d in deltas)
    assert sum(d.k for d in deltas) == round(0.02 * total)
    assert all(d.values.requires_grad for d in deltas) and any(d.values.abs().sum() > 0 for d in deltas)
    assert al.adapters(model)["default"].full_steps is None  # a plain SFT adapter now


def test_sft_stopped_in_the_full_phase_stays_dense(tmp_path, caplog):
    model = model_with("sft")
    with caplog.at_level(logging.WARNING, logger="adapterlab"):
        train(model, tmp_path, steps=2, save_steps=100)
    assert all(
        isinstance(layer.deltas["default"], PhasedDelta) for _, layer in al.model.adapter_layers(model)
    )
    assert any("full phase" in r.getMessage() for r in caplog.records)


def test_hft_stages_train_only_their_half(tmp_path):
    model = model_with("hft")
    config = al.adapters(model)["default"]
    start = adapter_state(model)
    train(model, tmp_path, steps=2, save_steps=100)  # stage 0 only
    half = set(al.hft.select_half(model, seed=0))
    moved = {
        k.split(".deltas.")[0].replace(".base_layer", "")
        for k, v in adapter_state(model).items()
        if not torch.equal(v, start[k])
    }
    assert moved and moved <= half and len(config.targets) > len(half)


def test_callback_refuses_a_model_without_adapters(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(al.AdapterNameError, match="al.inject"):
        Trainer(model=tiny_llama(), args=args, train_dataset=data(), callbacks=[AdapterCallback()])


def test_trainer_and_callback_work_without_peft(tmp_path):
    """peft hidden (sys.modules["peft"] = None: find_spec says absent, import fails)."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
sys.modules["peft"] = None
sys.path.insert(0, {str(Path(__file__).parent)!r})
import transformers.utils.import_utils as iu
assert not iu.is_peft_available()
import adapterlab as al
from test_trainer import model_with, train
model = model_with("lora")
train(model, {str(tmp_path)!r}, steps=2, save_steps=2)
al.save(model, {str(tmp_path / "out")!r})
from pathlib import Path
print("ok", sorted(p.name for p in Path({str(tmp_path)!r}).iterdir()))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ok" in run.stdout and "checkpoint-2" in run.stdout and "'out'" in run.stdout
