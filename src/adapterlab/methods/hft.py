"""HFT, half fine-tuning (Hui et al., ACL 2025): each stage trains a seeded half of every layer's
modules, by category, as dense deltas (`select_half`, `next_stage`, or `stage_steps` within one
run). docs/methods/hft.md.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import TargetSpec, check_number, register
from ..errors import AdapterNameError, ConfigError, TargetError, closest
from ..model import adapters, deltas, inject
from ..targeting import layer_index, layer_stacks, logical_modules, matches, output_head
from .dense import DenseConfig, dense_kind

Categories = dict[str, list[str]]

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


# module paths relative to one transformer layer, per `model.config.model_type`
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


@register
@dataclass
class HFTConfig(DenseConfig):
    """Half fine-tuning. `seed` draws the half; `categories` ({category: [paths relative to a layer]})
    replaces the built-in map for the model's architecture. `layers` keeps only those layer indices,
    `exclude` removes modules before the halves are drawn. `targets` is filled in by `inject` with
    the chosen module paths (pass a list only to hand-pick them)."""

    method = "hft"
    summary_fields = ("seed",)
    targets: TargetSpec = "all"
    seed: int = 0
    categories: Categories | None = None
    stage_steps: int | None = None  # stages within one run: a new half every stage_steps steps

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"hft: seed={self.seed!r} must be an integer >= 0")
        if self.categories is not None:
            ok = (
                isinstance(self.categories, dict)
                and self.categories
                and all(
                    isinstance(k, str)
                    and isinstance(v, (list, tuple))
                    and v
                    and all(isinstance(p, str) and p for p in v)
                    for k, v in self.categories.items()
                )
            )
            if not ok:
                raise ConfigError(
                    f"hft: categories={self.categories!r} must map category names to non-empty lists of module "
                    "paths relative to one layer, e.g. {'attention': ['self_attn.q_proj', 'self_attn.k_proj'], "
                    "'ffn': ['mlp.up_proj', 'mlp.down_proj']}"
                )
            self.categories = {k: list(v) for k, v in self.categories.items()}
        if self.stage_steps is not None:
            check_number(self, "stage_steps", low=1, integer=True, hint="or None for one half per adapter")

    def for_model(self, model: nn.Module) -> HFTConfig:
        if isinstance(self.targets, list):  # chosen already (a saved stage, or hand-picked)
            return self
        if self.stage_steps is not None:  # every module some stage may train
            chosen = [
                p
                for _, cats in _filtered_groups(model, self.categories, self.layers, self.exclude)
                for members in cats.values()
                for p in members
            ]
        else:
            chosen = select_half(model, self.seed, self.categories, layers=self.layers, exclude=self.exclude)
        return dataclasses.replace(self, targets=chosen)

    def before_step(self, model: nn.Module, name: str, step: int) -> None:
        """Drop the gradients of the modules outside this stage's half."""
        if self.stage_steps is None:
            return
        stage = step // self.stage_steps
        halves = self.__dict__.setdefault("_halves", {})  # per stage; not a config field
        if stage not in halves:
            halves[stage] = set(
                select_half(model, self.seed + stage, self.categories, self.layers, self.exclude)
            )
        for path, _, delta in deltas(model, name):
            if path not in halves[stage]:
                for p in delta.parameters():
                    p.grad = None

    def after_step(self, model: nn.Module, name: str, step: int, optimizer: Any | None) -> None:
        """At a stage boundary, reset the optimizer's state (each stage starts fresh)."""
        if self.stage_steps is not None and optimizer is not None and (step + 1) % self.stage_steps == 0:
            for _, _, delta in deltas(model, name):
                for p in delta.parameters():
                    optimizer.state.pop(p, None)


def category_map(model: nn.Module) -> Categories:
    """The built-in categories for `model.config.model_type`; `ConfigError` if there are none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    example = ""
    stacks = layer_stacks(model)
    if stacks:
        first = next(iter(stacks.values()))[0]
        inside = [
            p[len(first) + 1 :]
            for p, m in logical_modules(model)
            if p.startswith(first + ".") and dense_kind(m) is not None
        ]
        example = f"; the modules of {first!r} are {inside[:12]}"
    raise ConfigError(
        f"hft: no module-category map for architecture {model_type!r} (built in: {', '.join(sorted(ARCHITECTURES))}). "
        "Pass categories={'attention': [...], 'ffn': [...], 'norm': [...]} with module paths relative to one "
        f"layer{example}"
    )


def layer_groups(model: nn.Module, categories: Categories) -> list[tuple[str, Categories]]:
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


def _filtered_groups(
    model: nn.Module, categories: Categories | None, layers: list[int] | None, exclude: TargetSpec | None
) -> list[tuple[str, Categories]]:
    """`layer_groups`, keeping only `layers` and dropping `exclude`d modules."""
    groups = layer_groups(model, categories or category_map(model))
    if layers is not None:
        groups = [g for g in groups if layer_index(g[0]) in layers]
        if not groups:
            raise TargetError(f"hft: layers={layers} selects no layer that holds the category modules")
    if exclude is not None:
        modules, head = dict(logical_modules(model)), output_head(model)
        groups = [
            (
                layer,
                {c: [p for p in ps if not matches(p, modules[p], exclude, head)] for c, ps in cats.items()},
            )
            for layer, cats in groups
        ]
    return groups


def select_half(
    model: nn.Module,
    seed: int = 0,
    categories: Categories | None = None,
    layers: list[int] | None = None,
    exclude: TargetSpec | None = None,
) -> list[str]:
    """The module paths one HFT stage trains, in model order (deterministic for a given seed)."""
    groups = _filtered_groups(model, categories, layers, exclude)
    rng = random.Random(seed)
    n_layers = len(groups)
    heavy: dict[str, set[int]] = {}  # per odd-sized category: the layers that freeze ⌈n/2⌉
    for cat in groups[0][1]:
        k = n_layers // 2 + (n_layers % 2 == 1 and rng.random() < 0.5)
        heavy[cat] = set(rng.sample(range(n_layers), k))
    chosen: list[str] = []
    for i, (_, cats) in enumerate(groups):
        for cat, members in cats.items():
            n = len(members)
            n_frozen = n // 2 + (n % 2 == 1 and i in heavy[cat])
            frozen = set(rng.sample(members, n_frozen))
            chosen.extend(p for p in members if p not in frozen)
    order = {p: i for i, (p, _) in enumerate(logical_modules(model))}
    return sorted(chosen, key=order.__getitem__)


def next_stage(model: nn.Module, seed: int | None = None, name: str | None = None) -> str:
    """Start a new HFT stage: the earlier stages stay active but frozen, a freshly drawn half
    trains as a new adapter. `seed` defaults to the last stage's seed + 1, `name` to
    "hft_stage<k>". Returns the new adapter's name."""
    stages = {n: c for n, c in adapters(model).items() if isinstance(c, HFTConfig)}
    if not stages:
        raise AdapterNameError(
            "hft: this model has no HFT stage yet; start one with al.inject(model, 'hft', seed=0)"
        )
    last = list(stages.values())[-1]
    seed = last.seed + 1 if seed is None else seed
    name = name or f"hft_stage{len(stages)}"
    inject(model, dataclasses.replace(last, seed=seed, targets="all"), name=name)
    return name
