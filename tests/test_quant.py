"""Quantized bases: bitsandbytes Linear4bit (NF4/FP4, double quantization, fp32/bf16 compute) and
Linear8bitLt, torchao int8 weight-only. LoRA trains on them, its files load in PEFT on the same
quantized base and in a full-precision base, merge requantizes (and unmerge restores the packed
weight bit for bit), and methods that edit weight entries are refused before anything changes."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
torchao_quant = pytest.importorskip("torchao.quantization")
peft = pytest.importorskip("peft")

from conftest import randomize_lora, tiny_llama  # noqa: E402

import adapterlab as al  # noqa: E402
from adapterlab import quant  # noqa: E402
from adapterlab.layer import AdapterLayer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _replace_linears(model: nn.Module, build) -> nn.Module:
    """Every nn.Linear inside the decoder layers replaced by `build(linear)` (lm_head stays fp32)."""
    for module in list(model.model.layers.modules()):
        for leaf, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, leaf, build(child))
    return model


def llama4(quant_type: str = "nf4", double: bool = True, compute: torch.dtype = torch.float32, seed: int = 0):
    def build(linear: nn.Linear) -> nn.Module:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute,
            quant_type=quant_type,
            compress_statistics=double,
        )
        q.load_state_dict(linear.state_dict())
        # bitsandbytes' AVX512-BF16 inference path (CPUs that have it, eval + no grad) repacks the
        # weight, computes in bf16 and fails on layers under 64 inputs; off, so the exactness checks
        # compare our arithmetic, not the CPU's
        q.support_avx512bf16_for_cpu = False
        return q.to("cpu")  # quantizes

    model = _replace_linears(tiny_llama(seed), build)
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes layers
    return model.eval()


def llama8(seed: int = 0):
    def build(linear: nn.Linear) -> nn.Module:
        q = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=0.0,
        )
        q.load_state_dict(linear.state_dict())
        return q.to("cpu")

    model = _replace_linears(tiny_llama(seed), build)
    model.is_loaded_in_8bit = True
    return model.eval()  # eval: bitsandbytes' int8 matmul (train mode dequantizes instead), as PEFT sets


def llama_ao(config=None, seed: int = 0):
    model = tiny_llama(seed)
    torchao_quant.quantize_(model.model.layers, config or torchao_quant.Int8WeightOnlyConfig())
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as plain tensors (torchao weights as their int8 data and scales)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "qdata"):
            out[k + ".qdata"], out[k + ".scale"] = v.qdata.clone(), v.scale.clone()
        else:
            out[k] = v.detach().clone()
    return out


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def tree(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def train(model: nn.Module, ids: torch.Tensor, steps: int = 4) -> list[float]:
    """A few AdamW steps; checks every LoRA factor gets a nonzero gradient (A from step 1, as B = 0 at 0)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad and (step > 0 or "lora_B" in name):
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0], losses
    return losses


# -- the quant helper ---------------------------------------------------------------------------
def test_quant_helper_shapes_and_dequantization():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q4 = llama4().model.layers[0].mlp.down_proj
    assert quant.kind(q4) == quant.BNB_4BIT and q4.weight.shape != (32, 64)
    assert quant.logical_shape(q4) == (32, 64)
    assert quant.kind(llama8().model.layers[0].mlp.down_proj) == quant.BNB_8BIT
    assert quant.kind(llama_ao().model.layers[0].mlp.down_proj) == quant.TORCHAO
    assert not quant.is_quantized(linear) and quant.logical_shape(linear) == (48, 64)
    full = sum(p.numel() for p in tiny_llama().parameters())
    assert (
        al.trainable_summary(llama4()).total == al.trainable_summary(llama8()).total == full
    )  # logical entries
    # a has_fp16_weights 8-bit layer keeps a float weight: nothing packed to handle
    assert not quant.is_quantized(bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=True))
    for dq in (True, False):
        q = bnb.nn.Linear4bit(64, 48, quant_type="nf4", compress_statistics=dq)
        q.load_state_dict(linear.state_dict())
        q = q.to("cpu")
        w = quant.dequantized_weight(q)
        assert w.shape == (48, 64) and w.dtype == torch.float32
        x = torch.randn(5, 64)
        torch.testing.assert_close(q(x), nn.functional.linear(x, w, q.bias), atol=1e-5, rtol=1e-5)
        assert (w - linear.weight).abs().max() < 0.05


def test_adapterlab_imports_without_quantization_libraries():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; sys.modules['torchao'] = None\n"
        "import torch, adapterlab as al\n"
        "m = al.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), 'lora', r=2)\n"
        "al.merge(m); al.unmerge(m); al.dequantize(m); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# -- 4-bit: train, save, load in PEFT (same base and fp32 base) ------------------------------------
def test_4bit_train_save_peft_same_base_and_fp32_base(tmp_path, ids):
    model = llama4()
    al.inject(model, "lora", r=4, alpha=8, targets=TARGETS)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.deltas["default"].lora_A.weight.shape == (4, 64)  # logical in_features, not the packed shape
    assert layer.deltas["default"].lora_B.weight.shape == (32, 4)
    train(model, ids)
    ours = logits(model, ids)
    al.save(model, tmp_path / "a")

    theirs = peft.PeftModel.from_pretrained(llama4(), tmp_path / "a").eval()
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj).__module__.startswith(
        "peft.tuners.lora.bnb"
    )
    diff = (logits(theirs, ids) - ours).abs().max().item()
    print(f"4-bit: PEFT on the same 4-bit base vs ours, max abs diff {diff:.3g}")
    assert diff <= 1e-6

    # train in 4-bit, serve in full precision: PEFT and adapterlab agree on an fp32 base
    peft_fp32 = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval(), ids)
    ours_fp32 = logits(al.load(tiny_llama(), tmp_path / "a"), ids)
    assert (ours_fp32 - peft_fp32).abs().max().item() <= 1e-6
    assert (ours_fp32 - ours).abs().max() < 0.5  # the same adapter on a slightly different base


@pytest.mark.parametrize(
    "quant_type,double,compute",
    [
        ("nf4", True, torch.float32),
        ("nf4", False, torch.bfloat16),
        ("fp4", True, torch.bfloat16),
        ("fp4", False, torch.float32),
    ],
)
def test_4bit_variants_train_merge_unmerge_exact(quant_type, double, compute, ids):
    model = llama4(quant_type, double, compute)
    base = state(model)
    al.inject(model, "lora", r=4, targets=["q_proj", "v_proj"])
    train(model, ids, steps=3)
    randomize_lora(model, std=0.05)
    before = state(model)
    unmerged = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 4-bit rounding warning has its own test
        errors = al.merge(model)
    assert set(errors) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert all(0 < e < 0.1 for e in errors.values())
    merged = logits(model, ids)
    assert 0 < (merged - unmerged).abs().max() < 0.2
    al.unmerge(model)
    assert same_state(state(model), before)  # packed codes and statistics, bit for bit
    assert torch.equal(logits(model, ids), unmerged)
    al.unload(model)
    assert same_state(state(model), base)


@pytest.mark.parametrize("make", [llama4, llama8, llama_ao], ids=["4bit", "8bit", "torchao"])
def test_al_load_on_the_same_quantized_base(make, tmp_path, ids):
    model = make()
    al.inject(model, "lora", r=4, targets=["q_proj", "down_proj"])
    randomize_lora(model, std=0.1)
    ours = logits(model, ids)
    al.save(model, tmp_path / "a")
    other = make()
    packed = state(other)
    al.load(other, tmp_path / "a")  # the load-time shape check builds deltas on meta copies of the layers
    assert torch.equal(logits(other, ids), ours)
    al.unload(other)
    assert same_state(state(other), packed)


def test_bf16_activations_through_a_bf16_compute_4bit_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.bfloat16)
    q.load_state_dict(linear.state_dict())
    model = al.inject(nn.Sequential(q.to("cpu")), "lora", r=4)
    randomize_lora(model)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    delta = model[0].deltas["default"]
    assert delta.lora_A.weight.grad is not None and delta.lora_A.weight.grad.dtype == torch.float32
    expected = nn.functional.linear(
        x.float(), quant.dequantized_weight(q) + delta.delta_weight().detach(), q.bias.float()
    )  # (bitsandbytes cast the bias to bf16 in place)
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("make", [llama4, llama8, llama_ao], ids=["4bit", "8bit", "torchao"])
def test_lora_trains_under_bf16_autocast(make, ids):
    model = make()
    al.inject(model, "lora", r=4, targets=["q_proj", "down_proj"])
    randomize_lora(model, std=0.05)
    model.train()
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


# -- 8-bit: merge within PEFT's error, exact unmerge, PEFT loads it --------------------------------
def test_8bit_merge_within_peft_error_and_unmerge_exact(tmp_path, ids):
    model = llama8()
    al.inject(model, "lora", r=4, alpha=8, targets=TARGETS)
    randomize_lora(model, std=0.1)
    packed = state(model)
    unmerged = logits(model, ids)
    with al.disabled(model):
        base = logits(model, ids)
    al.save(model, tmp_path / "a")

    errors = al.merge(model)
    assert len(errors) == 6 and max(errors.values()) < 5e-3
    merged = logits(model, ids)
    al.unmerge(model)
    assert same_state(state(model), packed)
    assert torch.equal(logits(model, ids), unmerged)

    theirs = peft.PeftModel.from_pretrained(llama8(), tmp_path / "a").eval()
    theirs_unmerged = logits(theirs, ids)
    assert (theirs_unmerged - unmerged).abs().max().item() <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that 8-bit merges round
        theirs_merged = logits(theirs.merge_and_unload(), ids)
    ours_moved = (merged - unmerged).abs().max().item()
    peft_moved = (theirs_merged - theirs_unmerged).abs().max().item()
    effect = (unmerged - base).abs().max().item()
    print(
        f"8-bit merge moves outputs by {ours_moved:.3g} (PEFT: {peft_moved:.3g}); the adapter moves them {effect:.3g}"
    )
    assert ours_moved <= 1.5 * peft_moved + 1e-4
    assert ours_moved < effect / 20  # the adapter is in the merged weights, not lost to rounding

    unloaded = al.unload(model, merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in unloaded.modules())
    assert type(unloaded.model.layers[0].mlp.down_proj) is bnb.nn.Linear8bitLt
    torch.testing.assert_close(logits(unloaded, ids), merged, atol=0, rtol=0)


def test_8bit_trains(ids):
    model = llama8()
    al.inject(model, "lora", r=4, targets=["q_proj", "v_proj"])
    train(model, ids, steps=3)


# -- merge reporting and the dequantized path ---------------------------------------------------
def test_lossy_merge_warns_and_dequantized_merge_is_exact(ids):
    model = llama4()
    al.inject(model, "lora", r=4, targets=["q_proj"])
    randomize_lora(model, std=1e-3)  # ΔW far below a 4-bit step
    unmerged = logits(model, ids)
    with pytest.warns(UserWarning, match="keeps only part of the adapter"):
        errors = al.merge(model)
    assert all(e > 0 for e in errors.values())
    al.unmerge(model)

    # serving in full precision: dequantize, then merge (nothing is requantized)
    al.dequantize(model, torch.float32)
    assert not any(quant.is_quantized(m) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdapterLayer)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert al.merge(model) == {}  # a full-precision model: no rounding to report
    out = al.unload(model, merge=True)
    assert type(out.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (logits(out, ids) - unmerged).abs().max() <= 1e-5


def test_dequantize_bf16_keeps_merged_adapters_merged(ids):
    model = llama8()
    al.inject(model, "lora", r=4, targets=TARGETS)
    randomize_lora(model, std=0.1)
    unmerged = logits(model.train(), ids)  # train mode: bitsandbytes dequantizes, as the dense model will
    al.merge(model)
    al.dequantize(model, torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.merged == {"default": 1.0} and layer.base_layer.weight.dtype == torch.bfloat16
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear  # not adapted, dequantized too
    out = al.unload(model.float(), merge=True)
    assert (logits(out, ids) - unmerged).abs().max() < 0.05  # bf16 rounding of the weights
    with pytest.raises(al.ConfigError, match="torch.bfloat16"):
        al.dequantize(out, torch.int8)


# -- torchao ------------------------------------------------------------------------------------
def test_torchao_int8_trains_loads_in_peft_and_merges(tmp_path, ids):
    model = llama_ao()
    al.inject(model, "lora", r=4, targets=TARGETS)
    train(model, ids, steps=3)
    randomize_lora(model, std=0.05)
    packed, unmerged = state(model), logits(model, ids)
    al.save(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(llama_ao(), tmp_path / "a").eval()
    assert (logits(theirs, ids) - unmerged).abs().max().item() <= 1e-6

    errors = al.merge(model)
    assert len(errors) == 6 and max(errors.values()) < 5e-3
    weight = model.model.layers[0].mlp.down_proj.base_layer.weight
    assert type(weight).__name__ == "Int8Tensor"  # requantized in its own format
    assert (logits(model, ids) - unmerged).abs().max() < 0.02
    al.unmerge(model)
    assert same_state(state(model), packed)


def test_torchao_format_it_cannot_requantize_is_refused(ids):
    model = llama_ao(torchao_quant.IntxWeightOnlyConfig())
    al.inject(model, "lora", r=4, targets=TARGETS)
    randomize_lora(model)
    before = state(model)
    with pytest.raises(
        al.MergeError,
        match=r"model\.layers\.0\.self_attn\.q_proj.*IntxUnpackedToInt8Tensor.*"
        r"al\.dequantize.*nothing was merged",
    ):
        al.merge(model)
    assert same_state(state(model), before)
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, AdapterLayer))


# -- methods that edit weight entries are refused -------------------------------------------------
ENTRYWISE = [
    ("sara", {"density": 0.1}),
    ("sft", {}),
    ("dense", {}),
    ("hft", {}),
    ("locft", {"layer": 0, "module": "mlp.down_proj"}),
]


@pytest.mark.parametrize("method,options", ENTRYWISE, ids=[m for m, _ in ENTRYWISE])
@pytest.mark.parametrize("base", ["4bit", "8bit", "torchao"])
def test_entrywise_methods_refused_before_anything_changes(method, options, base):
    model = {"4bit": llama4, "8bit": llama8, "torchao": llama_ao}[base]()
    al.inject(model, "lora", r=2, targets=["q_proj"])
    before, modules = state(model), tree(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(al.UnsupportedModuleError) as info:
        al.inject(model, method, name="edit", **options)
    message = str(info.value)
    assert f"{method}: cannot adapt 'model.layers.0." in message
    assert "quantized" in message and "LoRA" in message and "al.dequantize" in message
    assert same_state(state(model), before) and tree(model) == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(al.adapters(model)) == ["default"]
