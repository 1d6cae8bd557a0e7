"""Mixed precision: every method trains and infers under torch.autocast (bf16, fp16) and on
half-precision bases; gradients under autocast stay within half-precision tolerance of fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import conv_net, tiny_llama

import adapterlab as al
from adapterlab.methods.levi import LEVI

HALF = [torch.bfloat16, torch.float16]
# relative error of a gradient computed with half-precision products (8 / 11 mantissa bits)
TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02}
LLAMA_METHODS = {
    "lora": {"r": 4, "dropout": 0.1},
    "sara": {"density": 0.1},
    "sft": {"density": 0.05},
    "sft-scheduled": {"density": 0.05, "full_steps": 2},
    "hft": {"seed": 0},
    "locft": {"layer": 1},
    "dense": {"targets": ["q_proj", "down_proj"]},
}


def injected(method: str):
    """A tiny Llama with `method` injected; plain LT-SFT deltas get a random support (they start empty
    and `train_lt_sft` would choose it)."""
    model = tiny_llama()
    al.inject(model, method.split("-")[0], **LLAMA_METHODS[method])
    gen = torch.Generator().manual_seed(2)
    for _, layer in al.model.adapter_layers(model):
        delta = layer.deltas["default"]
        if type(delta) is al.methods.sparse.SparseDelta and delta.k == 0:
            delta.set_support(torch.randperm(delta.numel, generator=gen)[: delta.numel // 20].sort().values)
    return model


def randomize_deltas(model: torch.nn.Module, std: float = 0.02) -> None:
    """Deltas start at zero (LoRA's B too), where A's gradient is zero: give every trainable
    parameter values so each one has a gradient to compare."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def grads(model: torch.nn.Module, loss_fn, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_fn()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    found = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert found and all(g is not None for g in found.values())
    return found


def assert_close_grads(model, loss_fn, dtype):
    ref, half = grads(model, loss_fn, None), grads(model, loss_fn, dtype)
    for name, g in ref.items():
        assert half[name].dtype == g.dtype == torch.float32, name  # parameters keep fp32 gradients
        err = (half[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < TOLERANCE[dtype], (name, float(err))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", list(LLAMA_METHODS))
def test_autocast_training_gradients_match_fp32(method, dtype, ids, single_thread):
    model = injected(method)
    model.train()
    randomize_deltas(model)
    assert_close_grads(model, lambda: model(ids, labels=ids).loss, dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", list(LLAMA_METHODS))
def test_autocast_inference_matches_fp32(method, dtype, ids, single_thread):
    model = injected(method)
    randomize_deltas(model)
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=dtype):
            half = model(ids).logits
    assert (half.float() - ref).abs().max() < 0.05 * ref.abs().max()
    with torch.no_grad(), al.disabled(model):  # the adapter is in the autocast output: not the base's
        base = model(ids).logits
    assert (base - ref).abs().max() > 10 * (half.float() - ref).abs().max()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["kernel", "reshape"])
def test_autocast_convlora(mode, dtype):
    net = conv_net()
    al.inject(net, "convlora", r=4, conv_mode=mode)
    randomize_deltas(net)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_close_grads(net, lambda: net(x).float().pow(2).mean(), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_levi(dtype, single_thread):
    from test_levi import batch, tiny_bert

    levi = LEVI(tiny_bert(), num_classes=3)
    ids, mask, labels = batch()
    randomize_deltas(levi, std=0.1)
    assert_close_grads(
        levi, lambda: F.cross_entropy(levi(input_ids=ids, attention_mask=mask).float(), labels), dtype
    )


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_routing_and_stacking(dtype, ids, single_thread):
    model = tiny_llama()
    al.inject(model, "lora", name="a", r=4)
    al.inject(model, "lora", name="b", r=2)
    randomize_deltas(model)
    for p in model.parameters():
        p.requires_grad_(True)  # both adapters train
    al.set_active(model, ["a", "b"])
    assert_close_grads(model, lambda: model(ids, labels=ids).loss, dtype)
    with torch.no_grad():
        for route in (["a", "b"], ["b", None]):
            with al.routing(model, route):
                ref = model(ids).logits
                with torch.autocast("cpu", dtype=dtype):
                    half = model(ids).logits
            assert (half.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["lora", "sara", "hft"])
def test_half_precision_base_trains_and_merges(method, dtype, ids, single_thread):
    model = tiny_llama().to(dtype)
    al.inject(model, method, **LLAMA_METHODS[method])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # adapters train in fp32 on a half base
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        al.merge(model)
        merged = model(ids).logits.float()
    assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_lora_under_autocast_keeps_a_half_size_input_copy(single_thread):
    """Under bf16 autocast the LoRA path saves x in bf16 (as the base matmul does), not in fp32."""
    from test_lora import saved_bytes

    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)

    def run(inject: bool) -> int:
        model = torch.nn.Sequential(torch.nn.Linear(128, 128))
        if inject:
            al.inject(model, "lora", r=4, targets=["0"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_bytes(lambda: model(x).float().sum())

    extra = run(True) - run(False)
    assert extra < 2 * x.numel()  # the base's bf16 copy of x is shared or ours is bf16 too


@pytest.mark.parametrize("method", ["lora", "sara"])
def test_trainer_bf16_with_the_callback_matches_fp32_training(method, tmp_path, single_thread):
    from test_trainer import METHODS, data
    from transformers import Trainer, TrainingArguments

    from adapterlab.integrations import AdapterCallback

    def run(bf16: bool) -> dict[str, torch.Tensor]:
        model = tiny_llama()
        options = dict(METHODS[method])
        al.inject(model, options.pop("method"), **options)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(bf16)),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=0.5,
            optim="sgd",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            bf16=bf16,
            lr_scheduler_type="constant",
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data(), callbacks=[AdapterCallback()])
        trainer.train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # SGD: the change of each parameter is a sum of its gradients, so it shows their error directly
    half, full = run(True), run(False)
    fresh = tiny_llama()
    al.inject(fresh, method, **{k: v for k, v in METHODS[method].items() if k != "method"})
    init = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert any(not torch.equal(half[n], full[n]) for n in full)  # bf16=True did run in bf16
    for name, want in full.items():
        moved, err = (want - init[name]).norm(), (half[name] - want).norm()
        assert moved > 0 and err < 0.2 * moved, (name, float(err), float(moved))
