"""HFT's module categories per transformer layer: the built-in maps (by `model.config.model_type`),
a map the user passes, or, for any other transformer, categories derived from the module tree
(`derived_groups`). docs/methods/hft.md#categories.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError, TargetError, closest
from ..targeting import layer_stacks, logical_modules
from .dense import dense_kind

Categories = dict[str, list[str]]
Groups = list[tuple[str, Categories]]  # [(layer path, {category: [full module paths]})]

_LLAMA: Categories = {
    "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "ffn": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "norm": ["input_layernorm", "post_attention_layernorm"],
}


def _moe(router: str) -> Categories:
    """Mixture-of-experts layers: the stacked expert weights and the router are categories of their own."""
    return {
        "attention": _LLAMA["attention"],
        "experts": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "router": [f"mlp.{router}"],
        "norm": _LLAMA["norm"],
    }


# module paths relative to one transformer layer, per `model.config.model_type`; they override
# the derived categories (MoE layers need them: experts and routers are not told apart by names)
ARCHITECTURES: dict[str, Categories] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3_moe": _moe("gate"),  # with decoder_sparse_step=1 and no mlp_only_layers (every layer MoE)
    "mixtral": _moe("gate"),
    "gpt_oss": _moe("router"),
    # GPT-2 fuses q, k, v into c_attn: its attention category has 2 members, so 1 of 2 trains
    "gpt2": {
        "attention": ["attn.c_attn", "attn.c_proj"],
        "ffn": ["mlp.c_fc", "mlp.c_proj"],
        "norm": ["ln_1", "ln_2"],
    },
    "bert": {
        "attention": [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ],
        "ffn": ["intermediate.dense", "output.dense"],
        "norm": ["attention.output.LayerNorm", "output.LayerNorm"],
    },
}

# path parts (lower case) that name an attention block; cross-attention is checked first
_CROSS = ("encdecattention", "encoder_attn", "crossattention", "cross_attn", "cross_attention")
_ATTENTION = ("attn", "attention")
_KINDS = {"linear", "hf_conv1d", "layer_norm", "rms_norm"}


def builtin_map(model: nn.Module) -> Categories | None:
    """The built-in categories for `model.config.model_type`, or None."""
    return ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None) or "")


def categorize(layer: nn.Module) -> Categories:
    """{category: [paths relative to `layer`]} of one transformer layer, from its module tree:
    norms (LayerNorm, RMSNorm, T5LayerNorm, …) are "norm"; a Linear / Conv1D inside a module named
    like cross-attention (`EncDecAttention`, `encoder_attn`, `crossattention`) is "cross_attention",
    inside one named like attention (`attn`, `attention`) "attention"; when no part of the path says,
    a module holding three or more projections of the same input size (q, k, v) is attention;
    every other Linear is "ffn". Empty categories are left out."""
    found: list[tuple[str, nn.Module, str]] = []
    for rel, module in logical_modules(layer):
        kind = dense_kind(module)
        if rel and kind in _KINDS:
            found.append((rel, module, kind))
    by_parent: dict[str, list[int]] = {}
    for rel, module, kind in found:
        if kind in ("linear", "hf_conv1d"):
            by_parent.setdefault(rel.rpartition(".")[0], []).append(_in_features(module, kind))
    cats: Categories = {}
    for rel, _, kind in found:
        parts = [p.lower() for p in rel.split(".")]
        if kind in ("layer_norm", "rms_norm"):
            cat = "norm"
        elif any(word in part for part in parts for word in _CROSS):
            cat = "cross_attention"
        elif any(word in part for part in parts for word in _ATTENTION):
            cat = "attention"
        else:
            sizes = by_parent[rel.rpartition(".")[0]]
            cat = "attention" if max(sizes.count(s) for s in sizes) >= 3 else "ffn"
        cats.setdefault(cat, []).append(rel)
    order = ("attention", "cross_attention", "ffn", "norm")
    return {c: cats[c] for c in order if c in cats}


def _in_features(module: nn.Module, kind: str) -> int:
    weight = module.weight
    assert isinstance(weight, nn.Parameter)
    return int(weight.shape[0] if kind == "hf_conv1d" else weight.shape[1])  # Conv1D stores (in, out)


def transformer_stacks(model: nn.Module) -> dict[str, list[str]]:
    """The outermost numbered layer lists (T5's `encoder.block`, not `encoder.block.0.layer`)."""
    stacks = layer_stacks(model)
    return {
        path: layers
        for path, layers in stacks.items()
        if not any(path.startswith(layer + ".") for other in stacks.values() for layer in other)
    }


def derived_groups(model: nn.Module) -> Groups:
    """Every layer of every outermost layer stack whose layers hold attention, with its derived
    categories (full module paths), in model order. `ConfigError` when there is none."""
    modules = dict(logical_modules(model))
    groups: Groups = []
    for layers in transformer_stacks(model).values():
        cats = [(layer, categorize(modules[layer])) for layer in layers]
        if any("attention" in c for _, c in cats):
            groups.extend(
                (layer, {cat: [f"{layer}.{rel}" for rel in rels] for cat, rels in c.items()})
                for layer, c in cats
            )
    if not groups:
        raise ConfigError(
            f"hft: no module-category map for architecture {_model_type(model)!r} (built in: "
            f"{', '.join(sorted(ARCHITECTURES))}), and no layer stack of the model holds attention to derive one "
            "from. Pass categories={'attention': [...], 'ffn': [...], 'norm': [...]} with module paths relative "
            f"to one layer{_example(model)}"
        )
    return groups


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _example(model: nn.Module) -> str:
    stacks = layer_stacks(model)
    if not stacks:
        return ""
    first = next(iter(stacks.values()))[0]
    inside = [
        p[len(first) + 1 :]
        for p, m in logical_modules(model)
        if p.startswith(first + ".") and dense_kind(m) is not None
    ]
    return f"; the modules of {first!r} are {inside[:12]}"


def layer_groups(model: nn.Module, categories: Categories) -> Groups:
    """[(layer path, {category: [full module paths]})] for every layer holding the categories'
    modules, in model order. Raises `TargetError` if a layer lacks one of them."""
    modules = dict(logical_modules(model))
    wanted = [rel for members in categories.values() for rel in members]
    groups = []
    for layer_paths in layer_stacks(model).values():
        if not any(f"{layer_paths[0]}.{rel}" in modules for rel in wanted):
            continue
        for layer in layer_paths:
            missing = [rel for rel in wanted if f"{layer}.{rel}" not in modules]
            if missing:
                inside = [p[len(layer) + 1 :] for p in modules if p.startswith(layer + ".")]
                raise TargetError(
                    f"hft: layer {layer!r} has no module {missing[0]!r} (closest: {closest(missing[0], inside)}); "
                    "fix the categories map"
                )
            groups.append(
                (layer, {cat: [f"{layer}.{rel}" for rel in members] for cat, members in categories.items()})
            )
    if not groups:
        everything = [p for p, m in modules.items() if dense_kind(m) is not None]
        raise TargetError(
            f"hft: no layer of the model holds the category modules {wanted[:6]} "
            f"(closest: {closest(wanted[0], everything)}); paths are relative to one layer"
        )
    return groups


def category_groups(model: nn.Module, categories: Categories | None = None) -> Groups:
    """The layers and their categories HFT draws from: `categories` if given, else the built-in map
    for the model's architecture, else the categories derived from the module tree."""
    chosen = categories or builtin_map(model)
    return layer_groups(model, chosen) if chosen else derived_groups(model)
