"""`model.save_pretrained` / `Trainer.save_model` on an injected Hugging Face model write the
adapters (PEFT's layout), never wrapper keys that `from_pretrained` would fill with random weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, tiny_llama
from safetensors import safe_open
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import adapterlab as al
from adapterlab.integrations import AdapterCallback

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


def base_dir(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    return path


def keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as f:
        return list(f.keys())


def trained_with_trainer(base: Path, out: Path, method: str, **options) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(base)
    al.inject(model, method, **options)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 96, (16, 12), generator=gen)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": r, "labels": r} for r in rows],
        callbacks=[AdapterCallback()],
    )
    trainer.train()
    trainer.save_model()
    return model.eval()


RELOAD = """
import sys, torch
import adapterlab as al
from transformers import LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(sys.argv[1])
al.load(model, sys.argv[2])
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[4])
"""


@pytest.mark.parametrize("method,options", [("lora", {"r": 4}), ("sara", {"density": 0.05})])
def test_trainer_save_model_reloads_exactly_in_a_fresh_process(tmp_path, method, options):
    base, out = base_dir(tmp_path), tmp_path / "run"
    model = trained_with_trainer(base, out, method, **options)
    with torch.no_grad():
        want = model(IDS).logits
        with al.disabled(model):
            assert not torch.equal(model(IDS).logits, want)  # it trained
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "checkpoint-2"} <= files
    assert "config.json" not in files and "model.safetensors" not in files
    assert all(
        k.startswith("base_model.model.") and ".base_layer." not in k
        for k in keys(out / "adapter_model.safetensors")
    )
    torch.save(IDS, tmp_path / "ids.pt")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            str(base),
            str(out),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "got.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "got.pt"), want)
    if method != "lora":  # PEFT cannot read it: transformers' own load fails, it builds nothing random
        with pytest.raises(Exception):  # noqa: B017 - whichever error transformers raises
            LlamaForCausalLM.from_pretrained(out)


def test_from_pretrained_on_the_directory_never_builds_random_weights(tmp_path):
    """With PEFT installed, transformers reads adapter_config.json, loads the base it names and
    the LoRA: the trained model exactly. A class-level load of a dir without config.json fails."""
    base = base_dir(tmp_path)
    model = LlamaForCausalLM.from_pretrained(base)
    al.inject(model, "lora", r=4)
    randomize_lora(model)
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, want)


def test_several_adapters_use_peft_subdirectories(tmp_path):
    model = tiny_llama()
    al.inject(model, "lora", r=4)
    al.inject(model, "sara", name="second", density=0.05)
    randomize_lora(model)
    model.save_pretrained(tmp_path)
    fresh = tiny_llama()
    al.load(fresh, tmp_path)
    al.load(fresh, tmp_path / "second", name="second")
    al.set_active(fresh, ["default", "second"])
    al.set_active(model, ["default", "second"])
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_save_model_keeps_the_other_files_of_the_directory(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "optimizer.pt").write_bytes(b"x" * 10)
    (tmp_path / "notes.txt").write_text("mine")
    model = tiny_llama()
    al.inject(model, "lora", r=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "checkpoint-7" / "optimizer.pt").read_bytes() == b"x" * 10
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_save_writes_nothing(tmp_path, monkeypatch):
    model = tiny_llama()
    al.inject(model, "lora", r=4)
    al.inject(model, "lora", name="b", r=2)
    import adapterlab.io as io

    real = io.adapter_files
    monkeypatch.setattr(io, "adapter_files", lambda m, name: real(m, name) if name == "default" else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_after_unload_save_pretrained_is_the_models_own(tmp_path):
    model = tiny_llama()
    al.inject(model, "lora", r=4)
    randomize_lora(model)
    al.unload(model, merge=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
    assert not any(".base_layer." in k for k in keys(tmp_path / "model.safetensors"))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
