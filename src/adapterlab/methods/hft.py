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
from ..errors import AdapterNameError, ConfigError, TargetError
from ..model import adapters, deltas, inject
from ..targeting import layer_index, logical_modules, matches, output_head
from .dense import DenseConfig
from .hft_map import ARCHITECTURES, Categories, Groups, builtin_map, category_groups, layer_groups

__all__ = [
    "ARCHITECTURES",
    "HFTConfig",
    "category_map",
    "describe",
    "layer_groups",
    "next_stage",
    "select_half",
]


@register
@dataclass
class HFTConfig(DenseConfig):
    """Half fine-tuning. `seed` draws the half; `categories` ({category: [paths relative to a layer]})
    replaces the built-in map for the model's architecture, or the categories derived from its
    module tree (hft_map.py). `layers` keeps only those layer indices,
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


def category_map(model: nn.Module, categories: Categories | None = None) -> dict[str, Categories]:
    """{layer stack path: {category: [module paths relative to one layer]}}: what HFT draws from,
    per stack (T5's encoder and decoder differ), as the first layer of each stack has them:
    `categories` if given, else the built-in map, else the categories derived from the module tree."""
    found: dict[str, Categories] = {}
    for layer, cats in category_groups(model, categories):
        stack = _stack(layer)
        if stack not in found:
            found[stack] = {c: [p[len(layer) + 1 :] for p in ps] for c, ps in cats.items()}
    return found


def _filtered_groups(
    model: nn.Module, categories: Categories | None, layers: list[int] | None, exclude: TargetSpec | None
) -> Groups:
    """`layer_groups`, keeping only `layers` and dropping `exclude`d modules."""
    groups = category_groups(model, categories)
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
    halves = _halves(model, seed, categories, layers, exclude)
    chosen = [p for _, cats in halves for train, _ in cats.values() for p in train]
    order = {p: i for i, (p, _) in enumerate(logical_modules(model))}
    return sorted(chosen, key=order.__getitem__)


def _halves(
    model: nn.Module,
    seed: int,
    categories: Categories | None,
    layers: list[int] | None,
    exclude: TargetSpec | None,
) -> list[tuple[str, dict[str, tuple[list[str], list[str]]]]]:
    """[(layer path, {category: (trained paths, frozen paths)})], drawn with `random.Random(seed)`."""
    groups = _filtered_groups(model, categories, layers, exclude)
    rng = random.Random(seed)
    # per layer stack and category: the layers that freeze ⌈n/2⌉ of an odd-sized category, a random
    # half of the stack's layers (T5's decoder has a third norm its encoder lacks)
    heavy: dict[tuple[str, str], set[int]] = {}
    keys = dict.fromkeys((_stack(layer), c) for layer, cats in groups for c in cats)  # in model order
    for key in keys:
        stack, cat = key
        having = [i for i, (layer, cats) in enumerate(groups) if _stack(layer) == stack and cat in cats]
        k = len(having) // 2 + (len(having) % 2 == 1 and rng.random() < 0.5)
        heavy[key] = set(rng.sample(having, k))
    halves = []
    for i, (layer, cats) in enumerate(groups):
        split = {}
        for cat, members in cats.items():
            n = len(members)
            frozen = set(rng.sample(members, n // 2 + (n % 2 == 1 and i in heavy[_stack(layer), cat])))
            split[cat] = ([p for p in members if p not in frozen], [p for p in members if p in frozen])
        halves.append((layer, split))
    return halves


def _stack(layer: str) -> str:
    return layer.rpartition(".")[0]


def describe(
    model: nn.Module,
    seed: int = 0,
    categories: Categories | None = None,
    layers: list[int] | None = None,
    exclude: TargetSpec | None = None,
) -> str:
    """The half `select_half` draws, as text: per layer and category, the modules that train (+)
    and those that stay frozen (-), paths relative to the layer; a total line first."""
    halves = _halves(model, seed, categories, layers, exclude)
    trained = sum(len(t) for _, cats in halves for t, _ in cats.values())
    total = sum(len(t) + len(f) for _, cats in halves for t, f in cats.values())
    source = (
        "categories given" if categories else "built-in map" if builtin_map(model) else "derived categories"
    )
    lines = [f"hft seed={seed}: {trained} of {total} modules train, in {len(halves)} layers ({source})"]
    order = {p: i for i, (p, _) in enumerate(logical_modules(model))}
    for layer, cats in halves:
        lines.append(layer)
        for cat, (train, frozen) in cats.items():
            marked = sorted([(p, "+") for p in train] + [(p, "-") for p in frozen], key=lambda m: order[m[0]])
            members = " ".join(f"{mark}{p[len(layer) + 1 :]}" for p, mark in marked)
            lines.append(f"  {cat} {len(train)}/{len(train) + len(frozen)}: {members}")
    return "\n".join(lines)


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
