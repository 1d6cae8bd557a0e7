"""Running statistics (BatchNorm) moved by adapter training are saved with the adapter, written back
at load, restored by unload and kept by unload(merge=True); bad files are refused atomically."""

import json

import pytest
import torch
from conftest import read_weights
from safetensors.torch import save_file
from torch import nn

import adapterlab as al
from adapterlab.cli import inspect_adapter
from adapterlab.running_stats import running_stats

pytestmark = pytest.mark.usefixtures("single_thread")


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 8, 8, generator=gen) * 2 + 1  # off the base's statistics (mean 0, var 1)


def train_in_train_mode(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def stats_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in running_stats(model).items()}


@pytest.mark.parametrize("conv_mode", ["kernel", "reshape"])
def test_a_convlora_cnn_trained_in_train_mode_reloads_to_identical_outputs(tmp_path, conv_mode):
    x = batch()
    base_stats = stats_of(bn_net())
    model = al.inject(bn_net(), "lora", r=2, targets="all-conv", conv_mode=conv_mode)
    train_in_train_mode(model, x)
    moved = stats_of(model)
    assert all(not torch.equal(moved[k], base_stats[k]) for k in moved)  # the test can fail
    with torch.no_grad():
        tuned = model(x)
    al.save(model, tmp_path / "a")
    _, meta = read_weights(tmp_path / "a" / al.io.WEIGHTS_FILE)
    block = json.loads(meta["adapterlab"])
    assert block["format_version"] == 2 and set(block["buffers"]) == set(moved)
    fresh = al.load(bn_net(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
    without = bn_net()  # the same deltas on the base statistics: what was lost before
    al.load(without, tmp_path / "a")
    with torch.no_grad():
        for k, v in running_stats(without).items():
            v.copy_(base_stats[k])
        assert not torch.allclose(without(x), tuned, atol=1e-3)
    info = inspect_adapter(tmp_path / "a")  # the CLI's reader skips the buffers
    assert info["targets"] == 2 and info["format_version"] == 2


def test_unload_restores_the_statistics_and_merge_keeps_them(tmp_path):
    x = batch()
    model = al.inject(bn_net(), "lora", r=2, targets="all-conv")
    base_stats = stats_of(bn_net())
    train_in_train_mode(model, x)
    moved = stats_of(model)
    with torch.no_grad():
        tuned = model(x)
    al.save(model, tmp_path / "a")
    al.save(al.load(bn_net(), tmp_path / "a"), tmp_path / "again")  # a loaded adapter keeps them
    with torch.no_grad():
        assert torch.equal(al.load(bn_net(), tmp_path / "again")(x), tuned)
    al.unload(model)  # the original model again
    assert all(torch.equal(v, base_stats[k]) for k, v in running_stats(model).items())
    merged = al.unload(al.load(bn_net(), tmp_path / "a"), merge=True)  # the fine-tuned model
    assert all(torch.equal(v, moved[k]) for k, v in running_stats(merged).items())
    with torch.no_grad():
        assert torch.allclose(merged(x), tuned, atol=1e-5)


def test_only_what_changed_since_the_adapter_was_added_is_saved(tmp_path):
    model = al.inject(bn_net(), "lora", r=2, targets="all-conv", name="eval_only")
    with torch.no_grad():
        model(batch())  # eval mode: nothing moves
    al.save(model, tmp_path / "plain", name="eval_only")
    _, meta = read_weights(tmp_path / "plain" / al.io.WEIGHTS_FILE)
    block = json.loads(meta["adapterlab"])
    assert block["format_version"] == 1 and "buffers" not in block
    head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # BatchNorm1d after an adapted Linear
    al.inject(head, "lora", r=2, targets=["0"], name="first")
    train_in_train_mode(head, torch.randn(6, 4), steps=1)
    al.inject(head, "lora", r=2, targets=["0"], name="second")  # added after the statistics moved
    al.save(head, tmp_path / "second", name="second")
    assert "buffers" not in json.loads(
        read_weights(tmp_path / "second" / al.io.WEIGHTS_FILE)[1]["adapterlab"]
    )
    al.save(head, tmp_path / "first", name="first")
    saved = json.loads(read_weights(tmp_path / "first" / al.io.WEIGHTS_FILE)[1]["adapterlab"])["buffers"]
    assert sorted(saved) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]


def damaged(tmp_path, change) -> str:
    model = al.inject(bn_net(), "lora", r=2, targets="all-conv")
    train_in_train_mode(model, batch(), steps=1)
    al.save(model, tmp_path / "a")
    tensors, meta = read_weights(tmp_path / "a" / al.io.WEIGHTS_FILE)
    block = json.loads(meta["adapterlab"])
    change(tensors, block)
    save_file(tensors, tmp_path / "a" / al.io.WEIGHTS_FILE, {"adapterlab": json.dumps(block)})
    return str(tmp_path / "a")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, b: b["buffers"].append("1.running_mean"), "buffers"),  # listed twice
        (lambda t, b: b["buffers"].append("9.running_mean"), "has no tensor"),
        (
            lambda t, b: (
                t.update({"base_model.model.9.running_mean": torch.zeros(8)})
                or b["buffers"].append("9.running_mean")
            ),
            "not a buffer of this model",
        ),
        (
            lambda t, b: t.update({"base_model.model.1.running_var": torch.ones(3)}),
            r"shape \[3\]",
        ),
        (
            lambda t, b: t.update({"base_model.model.1.running_var": torch.full((8,), float("nan"))}),
            "NaN",
        ),
    ],
)
def test_bad_buffers_are_refused_and_the_model_is_unchanged(tmp_path, change, message):
    directory = damaged(tmp_path, change)
    model = bn_net()
    before = stats_of(model)
    with pytest.raises(al.AdapterFileError, match=message):
        al.load(model, directory)
    assert al.adapters(model) == {}
    assert all(torch.equal(v, before[k]) for k, v in running_stats(model).items())


def test_peft_reads_the_statistics_too_and_a_checkpoint_merge_warns(tmp_path):
    from adapterlab.checkpoint import plan_merge

    x = batch()
    model = al.inject(bn_net(), "lora", r=2, targets="all-conv")  # kernel layout: PEFT's LoRA
    train_in_train_mode(model, x)
    with torch.no_grad():
        tuned = model(x)
    al.save(model, tmp_path / "a")
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(bn_net(), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), tuned, atol=1e-6)
    (tmp_path / "base").mkdir()
    save_file(bn_net().state_dict(), tmp_path / "base" / "model.safetensors")
    with pytest.warns(UserWarning, match="running statistics"):
        plan_merge(tmp_path / "base", [tmp_path / "a"], None, "linear", 2**20)


def test_hotswap_writes_the_statistics_of_the_swapped_in_adapter(tmp_path):
    x = batch()
    for name, data in (("a", x), ("b", x.flip(0) * 3 - 2)):
        model = al.inject(bn_net(), "lora", r=2, targets="all-conv")
        train_in_train_mode(model, data)
        al.save(model, tmp_path / name)
    served = al.load(bn_net(), tmp_path / "a")
    al.hotswap(served, tmp_path / "b")
    reference = al.load(bn_net(), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(served(x), reference(x))
