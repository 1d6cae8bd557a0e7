"""PEFT's LoRA file format, read side: LoraConfig fields, the modules a PEFT directory's tensors
describe, and Linear vs Conv1D decided as `al.load` decides it. `LoRAConfig` (lora.py) delegates
here; expert weights (`target_parameters`) are lora_experts.py's."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ..errors import AdapterFileError
from ..text import excerpt
from .lora_experts import peft_targets

PEFT_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
}
_PEFT_FACTOR = re.compile(r"(?P<path>.+)\.lora_(?P<which>[AB])\.weight")


def lora_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    """LoRAConfig fields from PEFT's LoraConfig dict; features we do not read are refused by name."""
    used = [
        k
        for k, default in PEFT_UNSUPPORTED.items()
        if data.get(k, default) not in (default, None, {}, [], False)
    ]
    if data.get("bias", "none") != "none":
        used.append(f"bias={excerpt(data['bias'], 50)}")
    if used:
        raise AdapterFileError(f"{where} uses PEFT LoRA features adapterlab does not read: {used}")
    return {
        **peft_targets(data, where),
        "method": "lora",
        "r": data.get("r"),
        "alpha": data.get("lora_alpha"),
        "dropout": data.get("lora_dropout", 0.0),
        "rslora": data.get("use_rslora", False),
    }


def base_entry(entry: dict[str, Any], base_shape: list[int], conv1d: bool | None) -> dict[str, Any]:
    """Linear or Conv1D as `al.load` decides it, by the module, whatever the file's `fan_in_fan_out`
    (PEFT resets the flag alike): the weight's layout if not square, else `conv1d`, else the guess."""
    if entry["type"] not in ("Linear", "Conv1D") or len(base_shape) != 2:
        return entry
    n_out, n_in = entry["shape"] if entry["type"] == "Linear" else entry["shape"][::-1]
    linear, conv, base = [n_out, n_in], [n_in, n_out], list(base_shape)
    if base not in (linear, conv):
        return entry
    kind = "Linear" if base == linear else "Conv1D"
    if base == linear == conv:
        kind = entry["type"] if conv1d is None else ("Conv1D" if conv1d else "Linear")
    return {"type": kind, "shape": linear if kind == "Linear" else conv}


def fingerprint_modules(
    data: dict[str, Any], tensors: dict[str, Tensor], where: str
) -> dict[str, dict[str, Any]]:
    """Linear (Conv1D with `fan_in_fan_out`) or ConvNd, with shapes read off lora_A / lora_B."""
    if data.get("target_parameters"):
        raise AdapterFileError(
            f"{where} is a PEFT target_parameters (expert weights) LoRA, whose layout needs the model: "
            "al.load it into the model and al.save it, then use that directory"
        )
    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        found = _PEFT_FACTOR.fullmatch(key)
        if found is None:
            raise AdapterFileError(
                f"{where}: tensor {key!r} is not a LoRA factor "
                "('base_model.model.<module>.lora_A.weight' / lora_B); adapterlab rebuilds only those"
            )
        factors.setdefault(found["path"], {})[found["which"]] = t
    fan_in_fan_out = bool(data.get("fan_in_fan_out"))
    modules = {}
    for path, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"{where}: module {path!r} has lora_{''.join(ab)} but not both factors")
        a, b = ab["A"].shape, ab["B"].shape
        if len(a) == 2:
            kind = "Conv1D" if fan_in_fan_out else "Linear"
            modules[path] = {"type": kind, "shape": [a[1], b[0]] if fan_in_fan_out else [b[0], a[1]]}
        else:
            modules[path] = {"type": f"Conv{len(a) - 2}d", "shape": [b[0], a[1], *a[2:]]}
    return modules


def inferred_fields(
    tensors: dict[str, Tensor], alphas: dict[str, float], where: str
) -> dict[str, Any] | None:
    """LoraConfig fields for a diffusers file without lora_adapter_metadata, as diffusers infers
    them: r from the lora_B factors, α from the network alphas, else α = r (scale 1). Mixed ranks or
    alphas (PEFT's rank_pattern / alpha_pattern) and DoRA are refused naming the module. None if
    no key is a LoRA factor."""
    ranks = {}
    for key, t in tensors.items():
        found = _PEFT_FACTOR.fullmatch(key)
        if key.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in key:
            raise AdapterFileError(
                f"{where}: {excerpt(key, 100)} is a DoRA magnitude (use_dora), a LoRA feature adapterlab does not read"
            )
        if found is not None and found["which"] == "B" and t.dim() >= 2:
            ranks[found["path"]] = int(t.shape[1])
    if not ranks:
        return None
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = next((p for p, n in ranks.items() if n != r), None)
    if odd is not None:
        raise AdapterFileError(
            f"{where}: module {odd!r} has rank {ranks[odd]}, the others {r}; LoRA of mixed ranks (PEFT's "
            "rank_pattern) is a feature adapterlab does not read"
        )
    stray = next((p for p in alphas if p not in ranks), None)
    if stray is not None:
        raise AdapterFileError(f"{where}: network alpha {stray + '.alpha'!r} belongs to no LoRA module")
    alpha: float = r
    if alphas:
        common = max(set(alphas.values()), key=list(alphas.values()).count)
        missing = next((p for p in ranks if p not in alphas), None)
        odd = missing if missing is not None else next((p for p, a in alphas.items() if a != common), None)
        if odd is not None:
            has = "no network alpha" if odd not in alphas else f"alpha {alphas[odd]:g}, the others {common:g}"
            raise AdapterFileError(
                f"{where}: module {odd!r} has {has}; LoRA with per-module alphas (PEFT's alpha_pattern) is a "
                "feature adapterlab does not read"
            )
        alpha = common
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks)}
