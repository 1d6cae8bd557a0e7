"""DenseDelta: every supported layer kind, folded and additive forms, gradients, merge, dtypes."""

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import adapterlab as al
from adapterlab.methods.dense import DenseDelta

pytestmark = pytest.mark.usefixtures("single_thread")


def make(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(5, 7), torch.randn(3, 5)
    if kind == "linear_nobias":
        return nn.Linear(5, 7, bias=False), torch.randn(2, 4, 5)
    if kind == "hf_conv1d":
        return Conv1D(7, 5), torch.randn(2, 3, 5)
    if kind == "conv2d":
        return nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), torch.randn(2, 3, 6, 6)
    if kind == "layer_norm":
        return nn.LayerNorm(6), torch.randn(2, 3, 6) * 3 + 1
    if kind == "llama_rms_norm":
        return LlamaRMSNorm(6), torch.randn(2, 3, 6) * 3
    return nn.RMSNorm(6, eps=1e-5), torch.randn(2, 3, 6) * 3


KINDS = ["linear", "linear_nobias", "hf_conv1d", "conv2d", "layer_norm", "llama_rms_norm", "torch_rms_norm"]


def with_delta(module: nn.Module, seed: int = 1) -> tuple[nn.Sequential, torch.Tensor]:
    """`module` wrapped with a dense delta holding random values; returns the model and ΔW."""
    model = al.inject(nn.Sequential(module), al.HFTConfig(targets=["0"]))
    delta = model[0].deltas["default"]
    assert isinstance(delta, DenseDelta) and torch.count_nonzero(delta.weight_delta) == 0
    with torch.no_grad():
        delta.weight_delta.copy_(
            torch.randn(delta.weight_delta.shape, generator=torch.Generator().manual_seed(seed))
        )
    return model, delta.weight_delta


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_gradient_equal_full_fine_tuning_of_the_weight(kind):
    module, x = make(kind)
    reference = copy.deepcopy(module)  # full fine-tuning: the module with W + ΔW as its own weight
    model, dw = with_delta(module)
    with torch.no_grad():
        reference.weight.add_(dw)
    out, expected = model(x), reference(x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    # the additive form, used when deltas apply one by one (routing), gives the same output
    layer = model[0]
    additive = layer.deltas["default"](x, layer.base_layer(x))
    assert torch.allclose(additive, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    assert torch.allclose(dw.grad, reference.weight.grad, atol=1e-5, rtol=1e-5)
    assert layer.base_layer.weight.grad is None  # the base weight is frozen


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    module, x = make(kind)
    base_w = module.weight.detach().clone()
    model, _ = with_delta(module)
    with torch.no_grad():
        unmerged = model(x)
        al.merge(model)
        assert torch.allclose(model(x), unmerged, atol=1e-5, rtol=1e-5)
        al.unmerge(model)
    assert (model[0].weight - base_w).abs().max() <= 1e-6
    with al.disabled(model), torch.no_grad():
        assert torch.allclose(model(x), make(kind)[0](x), atol=1e-6)


def test_bf16_base_trains_an_fp32_delta():
    torch.manual_seed(0)
    model = al.inject(nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16)), al.HFTConfig(targets=["0"]))
    delta = model[0].deltas["default"].weight_delta
    assert delta.dtype == torch.float32
    out = model(torch.randn(4, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_norm_not_of_the_form_gamma_times_n_is_refused():
    class OnePlusGammaRMSNorm(nn.Module):  # Gemma's layout: (1 + γ) ⊙ n(x)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    with pytest.raises(al.UnsupportedModuleError, match="γ ⊙ n"):
        al.inject(nn.Sequential(OnePlusGammaRMSNorm()), al.HFTConfig(targets=["0"]))


def test_module_without_a_dense_form_is_refused_by_name():
    with pytest.raises(al.UnsupportedModuleError, match="BatchNorm1d"):
        al.inject(nn.Sequential(nn.BatchNorm1d(3)), al.HFTConfig(targets=["0"]))
    with pytest.raises(al.UnsupportedModuleError, match="max_norm"):  # renormalizes W in place
        al.inject(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), al.HFTConfig(targets=["0"]))


def test_dense_delta_stacks_with_lora_on_one_module():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    x = torch.randn(3, 6)
    model, dw = with_delta(lin)
    al.inject(model, "lora", name="lora", r=2, targets=["0"])
    lora = model[0].deltas["lora"]
    with torch.no_grad():
        lora.lora_B.weight.normal_()
        expected = x @ (lin.weight + dw + lora.delta_weight()).t() + lin.bias
        assert torch.allclose(model(x), expected, atol=1e-5)


def tiny_llama_with_hft():
    """A tiny Llama with an HFT stage whose deltas hold random values."""
    model = al.inject(tiny_llama(), "hft", seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".deltas." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_per_sample_routing_uses_the_additive_form():
    model = tiny_llama_with_hft()
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = model(ids).logits
        with al.disabled(model):
            base = model(ids).logits
        with al.routing(model, ["default", None, "default"]):
            routed = model(ids).logits
    assert torch.allclose(routed[[0, 2]], tuned[[0, 2]], atol=1e-5)
    assert torch.allclose(routed[1], base[1], atol=1e-5)
