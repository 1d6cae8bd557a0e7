"""A LoRA saved by adapterlab loads in peft, and a peft LoRA loads in adapterlab, with equal outputs."""

import warnings

import pytest
import torch
from conftest import conv_net, randomize_lora, tiny_gpt2, tiny_llama

import adapterlab as al

peft = pytest.importorskip("peft")

CASES = {
    "llama": (
        tiny_llama,
        "all-linear",
        lambda: torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0)),
    ),
    "gpt2": (
        tiny_gpt2,
        "all-linear",
        lambda: torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0)),
    ),
    "conv2d": (
        conv_net,
        ["conv1", "conv2", "conv3"],
        lambda: torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)),
    ),
}


def outputs(model, x):
    with torch.no_grad():
        out = model(x) if x.is_floating_point() else model(input_ids=x).logits
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_our_save_loads_in_peft(tmp_path, case, rslora):
    build, targets, make_x = CASES[case]
    x = make_x()
    ours = al.inject(build(), "lora", r=4, alpha=8, rslora=rslora, targets=targets, conv_mode="kernel")
    randomize_lora(ours)
    al.save(ours, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    complaints = [str(w.message) for w in caught if "peft" in w.filename or "Unexpected" in str(w.message)]
    assert not complaints  # peft must not complain about our adapter_config.json
    n_lora = sum(1 for n, _ in theirs.named_parameters() if "lora_" in n)
    assert n_lora == sum(1 for n, _ in ours.named_parameters() if "lora_" in n)
    diff = (outputs(theirs, x) - outputs(ours, x)).abs().max().item()
    assert diff <= 1e-5
    assert (outputs(ours, x) - outputs(build(), x)).abs().max().item() > 1e-3  # the adapter does something


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_save_loads_in_ours(tmp_path, case):
    build, targets, make_x = CASES[case]
    x = make_x()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1)
    theirs = peft.get_peft_model(build(), cfg)
    randomize_lora(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = al.load(build(), tmp_path)
    cfg_ours = al.adapters(ours)["default"]
    assert (cfg_ours.r, cfg_ours.alpha, cfg_ours.dropout) == (4, 8, 0.1)
    diff = (outputs(theirs, x) - outputs(ours, x)).abs().max().item()
    assert diff <= 1e-5
    al.merge(ours)
    assert (outputs(theirs, x) - outputs(ours, x)).abs().max().item() <= 1e-5


def test_peft_features_we_cannot_read_are_refused(tmp_path):
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)
    )
    theirs.save_pretrained(tmp_path)
    with pytest.raises(al.AdapterFileError, match="lora_bias"):
        al.load(tiny_llama(), tmp_path)


def test_grouped_or_reshape_conv_adapters_are_not_labelled_peft(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    al.inject(model, "lora", r=2, targets=["0"])
    al.save(model, tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - any error from peft will do; it must not load
        peft.PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)), tmp_path)
    assert al.load(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)), tmp_path)
