"""LoRA on stacked MoE expert weights (`experts.ExpertWeights`): one rank-r pair per expert.

A: (E, r, in), B: (E, out, r); ΔW[e] = s·B[e]·A[e], (E, out, in), transposed for an (E, in, out)
parameter. In the forward pass the experts module reads W + s·B·A, formed by one `baddbmm` (no
loop over experts, no separate ΔW tensor: the same fold PEFT's `target_parameters` LoRA does).

PEFT's files (`LoraConfig(target_parameters=[...])`) store the factors per experts module M as
`M.lora_A.weight` (E·r, in), rows expert-major, and `M.lora_B.weight` (out, r·E), columns
rank-major; several parameters of one module nest, the first registered innermost:
`M.base_layer.lora_A.weight` is the first of two. `to_peft_tensors` / `from_peft_tensors` convert
between that and ours (`M.<param>.lora_A.weight` (E, r, in), `.lora_B.weight` (E, out, r)).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdapterFileError, UnsupportedModuleError
from ..experts import ExpertWeights
from ..layer import Delta
from ..text import excerpt

_NATIVE = re.compile(r"(?P<param>.+)\.lora_(?P<which>[AB])\.weight")
_PEFT = re.compile(r"(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<which>[AB])\.weight")


class ExpertLoRA(Delta):
    """Per-expert LoRA on a stacked weight; `forward(x, out, scale)` gets the weight as `out`."""

    peft_compatible = True
    refactorable = False

    def __init__(self, config: Any, base: ExpertWeights) -> None:
        super().__init__(config)
        from .lora import Factor, adapter_dtype

        e, n_in, n_out = base.num_experts, base.in_features, base.out_features
        if config.r > min(n_in, n_out):
            raise UnsupportedModuleError(
                f"{config.method}: rank r={config.r} exceeds the expert weight's smaller dimension "
                f"min(in={n_in}, out={n_out}); use r <= {min(n_in, n_out)}"
            )
        if config.dropout > 0:
            raise UnsupportedModuleError(
                f"{config.method}: dropout={config.dropout} cannot apply to an expert weight (the update is "
                "added to the weight, not to an input); use dropout=0.0 for expert targets"
            )
        weight = base.weight
        dtype = adapter_dtype(weight)
        a = torch.empty((e, config.r, n_in), dtype=dtype, device=weight.device)
        nn.init.kaiming_uniform_(a.view(e * config.r, n_in), a=math.sqrt(5))  # fan-in n_in, as PEFT's
        self.lora_A = Factor(a)
        self.lora_B = Factor(torch.zeros((e, n_out, config.r), dtype=dtype, device=weight.device))
        self.transposed = base.transposed
        self.scaling = config.scaling

    def delta_weight(self) -> Tensor:
        dw = torch.bmm(self.lora_B.weight, self.lora_A.weight) * self.scaling
        return dw.transpose(1, 2) if self.transposed else dw

    def forward(self, x: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
        """`out` is the weight so far (W, or W plus earlier adapters' ΔW): out + scale·ΔW."""
        a, b = self.lora_A.weight.to(out.dtype), self.lora_B.weight.to(out.dtype)
        lhs, rhs = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
        return torch.baddbmm(out, lhs, rhs, alpha=self.scaling * scale)

    def extra_repr(self) -> str:
        e, r, n_in = self.lora_A.weight.shape
        return f"experts={e}, r={r}, in={n_in}, out={self.lora_B.weight.shape[1]}"


# -- PEFT's tensor layout -----------------------------------------------------------------------------
def _nesting(modules: dict[str, dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """{parameter path: (experts module path, number of `.base_layer` PEFT puts before its factors)}
    for the expert-weight entries of fingerprint `modules` (each with its `index`)."""
    per_module: dict[str, list[tuple[int, str]]] = {}
    for path, entry in modules.items():
        if entry.get("type") in ("ExpertWeights", "TransposedExpertWeights"):
            module, _, _ = path.rpartition(".")
            per_module.setdefault(module, []).append((int(entry.get("index", 0)), path))
    found = {}
    for module, params in per_module.items():
        ordered = [p for _, p in sorted(params)]
        for i, path in enumerate(ordered):
            found[path] = (module, len(ordered) - 1 - i)
    return found


def to_peft_tensors(tensors: dict[str, Tensor], modules: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    """Our expert factors (keys `<param path>.lora_A.weight`, relative) in PEFT's layout and keys."""
    nesting = _nesting(modules)
    out = {}
    for key, t in tensors.items():
        found = _NATIVE.fullmatch(key)
        if found is None or found["param"] not in nesting:
            out[key] = t
            continue
        module, depth = nesting[found["param"]]
        prefix = module + ".base_layer" * depth
        if found["which"] == "A":  # (E, r, in) -> (E·r, in)
            out[f"{prefix}.lora_A.weight"] = t.reshape(-1, t.shape[2])
        else:  # (E, out, r) -> (out, r·E), column k·E + e
            out[f"{prefix}.lora_B.weight"] = t.permute(1, 2, 0).reshape(t.shape[1], -1).contiguous()
    return out


def from_peft_tensors(
    tensors: dict[str, Tensor], modules: dict[str, dict[str, Any]], where: str
) -> dict[str, Tensor]:
    """PEFT's expert factors (relative keys) back in our layout; other keys unchanged."""
    nesting = {v: k for k, v in _nesting(modules).items()}  # (module, depth) -> param path
    experts = {module: modules[p]["shape"][0] for (module, _), p in nesting.items()}
    out = {}
    for key, t in tensors.items():
        found = _PEFT.fullmatch(key)
        if found is None or found["module"] not in experts:
            out[key] = t
            continue
        depth = found["nest"].count(".base_layer")
        param = nesting.get((found["module"], depth))
        e = experts[found["module"]]
        if param is None or t.dim() != 2 or t.shape[0 if found["which"] == "A" else 1] % e:
            raise AdapterFileError(
                f"{where}: tensor {key!r} (shape {list(t.shape)}) fits no expert weight of "
                f"{found['module']!r}; was the adapter made for another model or other target_parameters?"
            )
        if found["which"] == "A":
            out[f"{param}.lora_A.weight"] = t.reshape(e, -1, t.shape[1])
        else:
            out[f"{param}.lora_B.weight"] = t.reshape(t.shape[0], -1, e).permute(2, 0, 1).contiguous()
    return out


def peft_target_parameters(paths: list[str], deltas: list[Delta]) -> tuple[list[str], list[str]]:
    """(module paths, parameter paths) of an adapter's targets: PEFT's target_modules / target_parameters."""
    params = [p for p, d in zip(paths, deltas, strict=True) if isinstance(d, ExpertLoRA)]
    return [p for p in paths if p not in params], params


def peft_targets(data: dict[str, Any], where: str) -> dict[str, Any]:
    """{"targets": target_modules + target_parameters} for a PEFT config with `target_parameters`
    (loading uses them to find the expert weights in the model), else {}."""
    params, modules = data.get("target_parameters") or [], data.get("target_modules") or []
    if params and not (isinstance(params, list) and all(isinstance(p, str) and p for p in params)):
        raise AdapterFileError(f"{where}: target_parameters={excerpt(params, 100)} is not a list of names")
    return {"targets": [*(modules if isinstance(modules, list) else []), *params]} if params else {}
