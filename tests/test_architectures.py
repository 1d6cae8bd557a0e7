"""The architecture matrix: every method on every family it applies to (tests/families.py) goes
through inject → one training step (train mode) → merged == unmerged → save → load into a fresh
base → identical outputs. ConvLoRA runs on conv models, HFT on transformers. timm's models are
skipped here (timm would pull a CUDA torch); the BatchNorm CNN stands in for its ResNet."""

import pytest
import torch
from families import CONV, FAMILIES, TRANSFORMERS, build
from torch import nn

import adapterlab as al

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = {
    "lora": {"method": "lora", "r": 2},
    "convlora": {"method": "convlora", "r": 2, "targets": "all-conv"},
    "sara": {"method": "sara", "density": 0.1},
    "sft": {"method": "sft", "density": 0.05, "full_steps": 1},
    "hft": {"method": "hft", "seed": 0},
    "dense": {"method": "dense"},
}
CASES = [
    (family, method)
    for family in FAMILIES
    for method in METHODS
    if not (method == "convlora" and family in TRANSFORMERS) and not (method == "hft" and family in CONV)
]


def options(family: str, method: str) -> dict:
    """The method's options on this family: conv models adapt their convs (and the UNet's linears)."""
    opts = dict(METHODS[method])
    if family in CONV and method != "convlora":
        opts.setdefault("targets", "all" if family == "unet" else "all-conv")
    return opts


def train_step(model: nn.Module, family, step: int) -> None:
    """One optimizer step in train mode, with the methods' schedules (SFT's selection, HFT's half)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    model.train()
    torch.manual_seed(step)  # dropout
    family.run(model, family.inputs).float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), "no gradient reached"
    al.before_step(model, step)
    torch.optim.SGD(trainable, lr=0.5).step()
    al.after_step(model, step)
    model.zero_grad()
    model.eval()


def output(model: nn.Module, family) -> torch.Tensor:
    with torch.no_grad():
        return family.run(model, family.inputs).float()


@pytest.mark.parametrize(("family_name", "method"), CASES)
def test_inject_train_merge_save_load(tmp_path, family_name, method):
    family = build(family_name)
    base = output(family.model, family)
    model = al.inject(family.model, **options(family_name, method))
    for step in range(2):  # SFT: the full phase, then its selected entries
        train_step(model, family, step)
    if method == "sft":
        al.sft.finish(model)
    tuned = output(model, family)
    assert not torch.allclose(tuned, base, atol=1e-6), "training changed nothing"
    al.merge(model)
    merged = output(model, family)
    scale = tuned.abs().max().item() + 1.0
    assert torch.allclose(merged, tuned, atol=1e-4 * scale), (merged - tuned).abs().max()
    al.unmerge(model)
    assert torch.allclose(output(model, family), tuned, atol=1e-5 * scale)
    al.save(model, tmp_path / "adapter")
    fresh = build(family_name)  # the same base weights (seed 0), with base running statistics
    al.load(fresh.model, tmp_path / "adapter")
    assert torch.allclose(output(fresh.model, fresh), tuned, atol=1e-6 * scale)
    with al.disabled(fresh.model):
        if family_name in TRANSFORMERS:  # no running statistics: disabled is the base model again
            assert torch.allclose(output(fresh.model, fresh), base, atol=1e-5 * scale)
