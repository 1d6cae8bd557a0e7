"""Mixture-of-experts weights as adapter targets.

In transformers 5 the experts of Mixtral, Qwen3-MoE, DeepSeek-V3 and gpt-oss are fused 3-D
parameters of one experts module (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not
`nn.Linear` modules. Here such a parameter becomes a target like a module:

- `ExpertWeights` is a small module standing for one stacked parameter (its `weight`), in the
  (E, out, in) layout; `TransposedExpertWeights` for (E, in, out) (gpt-oss). `targeting` lists one
  at the parameter's path (`model.layers.0.mlp.experts.gate_up_proj`) for every 3-D parameter of an
  experts module whose layout is known (`layout`).
- Injecting wraps it in an `AdapterLayer` that takes the parameter's place in the experts module
  (state-dict key `….gate_up_proj.base_layer.weight`). Hooks on the experts module put the
  effective weight W + Σ w·ΔW in its place for the duration of each forward pass, computed once
  per pass by the `AdapterLayer` (the "input" of a weight is ignored: its base output is W and each
  delta adds its ΔW), so the experts' own computation runs unchanged. Merge, unmerge, save and
  load go through `AdapterLayer` as for any module: ΔW is (E, out, in) in the parameter's layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import RoutingError, UnsupportedModuleError

# experts module class name -> True when its 3-D weights are (E, in, out). transformers' experts
# classes carry `is_transposed` themselves; this table is for those that do not.
LAYOUTS: dict[str, bool] = {
    "Qwen3MoeExperts": False,
    "MixtralExperts": False,
    "DeepseekV3Experts": False,
    "Qwen2MoeExperts": False,
    "GptOssExperts": True,
}
_HOOKS = "_adapterlab_expert_hooks"
_NO_INPUT = torch.empty(0)


def register_layout(class_name: str, transposed: bool) -> None:
    """Declare the layout of an experts class's 3-D weights: (E, in, out) when `transposed`, else
    (E, out, in), i.e. whether the module computes x @ W[e] or x @ W[e]ᵀ."""
    if not isinstance(transposed, bool):
        raise UnsupportedModuleError(f"register_layout: transposed={transposed!r} must be True or False")
    LAYOUTS[class_name] = transposed


def is_transposed(module: nn.Module) -> bool | None:
    """Whether `module`'s 3-D weights are (E, in, out); None when that cannot be told."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    for cls in type(module).__mro__:
        if cls.__name__ in LAYOUTS:
            return LAYOUTS[cls.__name__]
    return None


class ExpertWeights(nn.Module):
    """One stacked expert parameter as a module: `weight` (E, out, in); `forward` returns it (a
    weight has no input: the experts module reads it)."""

    transposed = False

    def __init__(self, weight: nn.Parameter, index: int = 0) -> None:
        super().__init__()
        self.weight = weight
        self.index = index  # position among its experts module's stacked weights (PEFT's nesting order)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[2 if self.transposed else 1]

    def forward(self, x: Tensor | None = None) -> Tensor:
        return self.weight

    def fingerprint_fields(self) -> dict[str, Any]:
        return {"index": self.index}

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}"


class TransposedExpertWeights(ExpertWeights):
    """A stacked expert parameter stored (E, in, out) (gpt-oss)."""

    transposed = True


KINDS = {cls.__name__: cls for cls in (ExpertWeights, TransposedExpertWeights)}


def stacked_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of `module`'s own 3-D parameters (still in place, not yet wrapped)."""
    return [(n, p) for n, p in module._parameters.items() if p is not None and p.dim() == 3]


def expert_weights(module: nn.Module) -> list[tuple[str, ExpertWeights]]:
    """`module`'s stacked weights as `ExpertWeights` targets, when its layout is known; the index
    counts wrapped ones too, so it is the same before and after injecting."""
    transposed = is_transposed(module)
    if transposed is None:
        return []
    names = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    names += [
        n for n, c in module.named_children() if isinstance(getattr(c, "base_layer", None), ExpertWeights)
    ]
    order = {n: i for i, n in enumerate(n for n in _registration_order(module) if n in names)}
    kind = TransposedExpertWeights if transposed else ExpertWeights
    return [(n, kind(p, order[n])) for n, p in stacked_weights(module)]


def _registration_order(module: nn.Module) -> list[str]:
    """Parameter names as the experts class registers them (wrapped ones at their original place)."""
    own = getattr(module, _HOOKS, None)
    return list(own[2]) if own is not None else list(module._parameters)


def explain_parameter(model: nn.Module, name: str) -> str | None:
    """Why target name `name` names a parameter that cannot be adapted, or None if it names none."""
    for path, module in model.named_modules():
        for pname, p in module._parameters.items():
            full = f"{path}.{pname}" if path else pname
            if p is None or not (full == name or full.endswith("." + name)):
                continue
            where = f"{full!r} ({type(module).__name__}.{pname}, shape {list(p.shape)})"
            if pname in ("weight", "bias") and p.dim() <= 2:
                return f"{where} is a module's own parameter; target the module {path!r} instead"
            if p.dim() != 3:
                return (
                    f"{where} is not a weight matrix or a stack of them (E, out, in); "
                    "only the experts' 3-D weights can be targeted as parameters"
                )
            return (
                f"{where}: cannot tell whether its layout is (E, out, in) or (E, in, out); declare it with "
                f"al.experts.register_layout({type(module).__name__!r}, transposed=...)"
            )
    return None


# -- the forward pass: the effective weight in the parameter's place ---------------------------------
def _put_effective(module: nn.Module, args: Any) -> None:
    from .layer import AdapterLayer

    for name, child in module._modules.items():
        if isinstance(child, AdapterLayer) and isinstance(child.base_layer, ExpertWeights):
            if child.routes is not None:
                raise RoutingError(
                    f"per-sample routing cannot apply to the expert weight {name!r} (every sample shares "
                    "the experts); route adapters without expert targets, or run one adapter per batch"
                )
            module.__dict__[name] = child(_NO_INPUT.to(child.base_layer.weight.device))


def _drop_effective(module: nn.Module, args: Any, output: Any) -> None:
    for name in list(module._modules):
        module.__dict__.pop(name, None)


def attach(parent: nn.Module, leaf: str) -> None:
    """Make room for the wrapper of weight `leaf` of experts module `parent`: install the hooks
    (once, with the first wrapper) and take the parameter out of `parent._parameters`."""
    if getattr(parent, _HOOKS, None) is None:
        pre = parent.register_forward_pre_hook(_put_effective)
        post = parent.register_forward_hook(_drop_effective, always_call=True)
        object.__setattr__(parent, _HOOKS, (pre, post, list(parent._parameters)))
    del parent._parameters[leaf]


def detach(parent: nn.Module, leaf: str, base: ExpertWeights) -> None:
    """Put the parameter back in place of its wrapper; remove the hooks with the last wrapper."""
    from .layer import AdapterLayer

    del parent._modules[leaf]
    parent.register_parameter(leaf, base.weight)
    order = _registration_order(parent)  # restore the class's parameter order (state-dict order)
    params = parent._parameters
    for n in sorted(params, key=lambda n: order.index(n) if n in order else len(order)):
        params[n] = params.pop(n)
    if not any(
        isinstance(c, AdapterLayer) and isinstance(c.base_layer, ExpertWeights) for c in parent.children()
    ):
        pre, post, _ = parent.__dict__.pop(_HOOKS)
        pre.remove()
        post.remove()


# -- checkpoints: fused stacks saved per expert ---------------------------------------------------------
# transformers saves Qwen3-MoE / DeepSeek-V3 / Mixtral experts per expert, as they are on the Hub:
# stack `<experts>.<param>` (E, out, in) is the keys `<legacy experts>.<e>.<leaf>.weight`, the rows of
# expert e split evenly among the leaves (gate_up_proj: gate rows, then up rows).
LEGACY_KEYS: list[tuple[str, str, dict[str, tuple[str, ...]]]] = [
    ("mlp.experts", "mlp.experts", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    ("mlp.experts", "block_sparse_moe.experts", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
]


def legacy_pieces(path: str, keys: Any) -> list[tuple[str, int, int, int]] | None:
    """[(checkpoint key, expert e, part j, parts n)] holding stacked weight `path` (E, out, in) per
    expert in a checkpoint with `keys`: the key's tensor is rows j of n of expert e. None if none."""
    module, _, param = path.rpartition(".")
    for fused, legacy, leaves in LEGACY_KEYS:
        if param not in leaves or not (module == fused or module.endswith("." + fused)):
            continue
        prefix = module[: len(module) - len(fused)] + legacy
        found, e = [], 0
        while all(f"{prefix}.{e}.{leaf}.weight" in keys for leaf in leaves[param]):
            n = len(leaves[param])
            found += [(f"{prefix}.{e}.{leaf}.weight", e, j, n) for j, leaf in enumerate(leaves[param])]
            e += 1
        if found:
            return found
    return None


def piece(stack: Tensor, e: int, j: int, n: int) -> Tensor:
    """Rows j of n of expert e of a stack (E, out, in)."""
    return stack[e].chunk(n, dim=0)[j]


def pieces_mismatch(
    path: str, shape: list[int], pieces: list[tuple[str, int, int, int]], tensors: Any
) -> str:
    """Why the per-expert keys `pieces` cannot hold stacked weight `path` of `shape`, or ""."""
    n = pieces[0][3]
    want, have = [shape[0] * n, shape[1] // n, shape[2]], [len(pieces), *tensors[pieces[0][0]].shape]
    if want == have and shape[1] % n == 0:
        return ""
    return (
        f"{path!r} has shape {shape} in the adapter; the checkpoint holds {have[0]} weights {have[1:]} for it"
    )
