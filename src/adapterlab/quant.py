"""Quantized base layers: bitsandbytes `Linear4bit` (NF4 / FP4) and `Linear8bitLt`, and
`nn.Linear` whose weight torchao's `quantize_` replaced by a quantized tensor subclass.

Everything adapterlab needs to know about a quantized weight is here, so the rest of the library
asks one question (`is_quantized`) and uses five answers:

- `logical_shape`: (out, in), the shape the weight has before packing (a 4-bit weight is stored
  as a packed uint8 column); LoRA factors and fingerprints use it.
- `dequantized_weight`: W as an fp32 (out, in) tensor, detached.
- `requantize`: store W' in the layer's own format (same quant type, block size, double
  quantization, storage dtype) in fresh storage; returns the rounding error max|deq(q(W')) − W'|.
- `stash` / `restore`: the objects holding the packed weight (and its statistics), kept aside
  and put back, so merge → unmerge restores the quantized weight bit for bit.
- `dequantized_linear`: a plain `nn.Linear` holding the dequantized weight (`al.dequantize`).

Neither bitsandbytes nor torchao is imported here: a layer from them exists only if the user
imported them, so they are taken from `sys.modules` when such a layer is met.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MergeError

BNB_4BIT, BNB_8BIT, TORCHAO = "bitsandbytes 4-bit", "bitsandbytes 8-bit", "torchao"


def kind(module: nn.Module) -> str | None:
    """`BNB_4BIT`, `BNB_8BIT`, `TORCHAO`, or None for a module whose weight is not quantized."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return BNB_4BIT
        # has_fp16_weights=True keeps a float weight (quantized per call): not a packed weight
        if isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8:
            return BNB_8BIT
    weight = getattr(module, "weight", None)
    if (
        isinstance(weight, Tensor)
        and type(weight).__module__.startswith("torchao.")
        and hasattr(weight, "dequantize")
    ):
        return TORCHAO
    return None


def is_quantized(module: nn.Module) -> bool:
    """True if `module`'s weight is stored quantized (bitsandbytes 4/8-bit, torchao)."""
    return kind(module) is not None


def describe(module: nn.Module) -> str:
    """The quantized format in words, for messages: 'bitsandbytes 4-bit (nf4, double quantization)'."""
    what = kind(module)
    if what == BNB_4BIT:
        w = _untyped(module).weight
        return f"{what} ({w.quant_type}{', double quantization' if w.compress_statistics else ''})"
    if what == TORCHAO:
        return f"{what} {type(module.weight).__name__}"
    return str(what)


def logical_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's shape as the layer computes with it ((out, in) for a quantized Linear)."""
    if kind(module) in (BNB_4BIT, BNB_8BIT):
        return (_untyped(module).out_features, _untyped(module).in_features)
    return tuple(_untyped(module).weight.shape)


def entrywise_refusal(module: nn.Module) -> str | None:
    """Why a method that edits individual weight entries (dense or sparse deltas) cannot adapt
    `module`, or None if its weight is not quantized."""
    if not is_quantized(module):
        return None
    return (
        f"its weight is quantized ({describe(module)}) and this method edits individual weight entries; "
        "use LoRA on quantized layers, or dequantize first (al.dequantize(model, torch.bfloat16))"
    )


def _untyped(module: nn.Module) -> Any:
    """`module` as the checker should see a quantized layer: its weight and `state` are
    bitsandbytes/torchao objects (CB, SCB, quant_state, ...) that torch's types do not describe."""
    return module


def _bnb() -> Any:
    return sys.modules["bitsandbytes"]


def _int8_state(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(codes, row scales) of a `Linear8bitLt`: on the weight until the first forward, then on
    `module.state` (bitsandbytes moves them there)."""
    w = _untyped(module).weight
    codes = (
        w.CB
        if w.CB is not None
        else (_untyped(module).state.CB if _untyped(module).state.CB is not None else w.data)
    )
    scales = w.SCB if w.SCB is not None else _untyped(module).state.SCB
    return codes, scales


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> Tensor:
    """W of a quantized layer, as a detached fp32 (out, in) tensor (what its forward computes with)."""
    what = kind(module)
    w = _untyped(module).weight
    if what == BNB_4BIT:
        F = _bnb().functional
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for AVX512-BF16 inference
            data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
        return F.dequantize_4bit(data, state).float().reshape(logical_shape(module))
    if what == BNB_8BIT:
        codes, scales = _int8_state(module)
        return codes.float() * (scales.float().unsqueeze(1) / 127)
    if what == TORCHAO:
        return w.dequantize().detach().float()
    raise TypeError(f"{type(module).__name__} has no quantized weight")


def _set_weight(module: nn.Module, weight: nn.Parameter) -> None:
    module._parameters["weight"] = weight


@torch.no_grad()
def requantize(module: nn.Module, weight: Tensor) -> float:
    """Store `weight` ((out, in), any float dtype) in `module`'s quantized format, in new storage
    (the old weight object is left as it was, for `restore`). Returns max|dequantized − weight|,
    the rounding error. Raises `MergeError` for a torchao format it cannot rebuild (see `merge_refusal`)."""
    what = kind(module)
    old = _untyped(module).weight
    if what == BNB_4BIT:
        bnb = _bnb()
        state = old.quant_state
        packed, new_state = bnb.functional.quantize_4bit(
            weight.to(device=old.device, dtype=state.dtype).contiguous(),
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        _set_weight(
            module,
            bnb.nn.Params4bit(
                packed,
                requires_grad=False,
                quant_state=new_state,
                blocksize=old.blocksize,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
                module=module,
                bnb_quantized=True,
            ),
        )
    elif what == BNB_8BIT:
        bnb = _bnb()
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(
            weight.to(old.device, torch.float32).contiguous()
        )
        _set_weight(
            module,
            bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales),
        )
        state = _untyped(module).state  # the next forward takes CB, SCB from the new weight
        state.CB = state.SCB = None
    elif what == TORCHAO:
        refusal = merge_refusal(module)
        if refusal:
            raise MergeError(refusal)
        new = type(old).from_hp(
            weight.to(old.device, old.dtype), _torchao_granularity(old), act_quant_kwargs=old.act_quant_kwargs
        )
        _set_weight(module, nn.Parameter(new, requires_grad=False))
    else:
        raise TypeError(f"{type(module).__name__} has no quantized weight")
    return float((dequantized_weight(module) - weight.float()).abs().max()) if weight.numel() else 0.0


def _torchao_granularity(old: Tensor) -> Any:
    """The torchao granularity `requantize` rebuilds `old` with (int8, per-row or per-tensor
    symmetric scales: Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig), or None."""
    block, zero = list(getattr(old, "block_size", [])), getattr(old, "zero_point", None)
    if type(old).__name__ != "Int8Tensor" or old.dim() != 2 or (zero is not None and bool(zero.any())):
        return None
    from torchao.quantization.granularity import PerRow, PerTensor

    return PerRow() if block == [1, old.shape[1]] else PerTensor() if block == list(old.shape) else None


def merge_refusal(module: nn.Module) -> str | None:
    """Why ΔW cannot be merged into `module`'s quantized weight, or None if it can (or is not quantized)."""
    if kind(module) == TORCHAO and _torchao_granularity(_untyped(module).weight) is None:
        w = _untyped(module).weight
        return (
            f"cannot requantize a torchao {type(w).__name__} (block size {list(getattr(w, 'block_size', []))}) "
            "after merging; keep the adapter unmerged, or dequantize first (al.dequantize(model, torch.bfloat16)) "
            "and merge into that"
        )
    return None


def stash(module: nn.Module) -> tuple[Any, ...]:
    """The objects that hold the layer's quantized weight, for `restore` after `requantize`."""
    w = _untyped(module).weight
    if kind(module) == BNB_8BIT:
        return (w, w.CB, w.SCB, _untyped(module).state.CB, _untyped(module).state.SCB)
    return (w,)


def restore(module: nn.Module, saved: tuple[Any, ...]) -> None:
    """Put back what `stash` returned: the quantized weight exactly as it was."""
    _set_weight(module, saved[0])
    if len(saved) == 5:
        saved[0].CB, saved[0].SCB, _untyped(module).state.CB, _untyped(module).state.SCB = saved[1:]


@torch.no_grad()
def dequantized_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain `nn.Linear` of `dtype` with the layer's dequantized weight and its bias."""
    out_features, in_features = logical_shape(module)
    bias = getattr(module, "bias", None)
    weight = dequantized_weight(module)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=bias.requires_grad)
    linear.train(module.training)
    return linear
