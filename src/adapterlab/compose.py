"""`al.combine`: adapters combined target by target (the tensor math is `arithmetic`), then
re-expressed as a new LoRA (SVD, or exact `cat`), sparse or dense adapter. docs/compose.md has
the formulas and how DARE's masks are drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .arithmetic import TENSOR_HOWS, check_density_p, combine_tensors, global_threshold
from .config import AdapterConfig
from .errors import AdapterNameError, ConfigError, UnsupportedModuleError
from .files.fill import on_meta
from .layer import AdapterLayer
from .methods.dense import DenseConfig
from .methods.lora import MAX_RANK, LoRAConfig, LowRankDelta
from .methods.sft import SFTConfig
from .model import adapter_layers, adapters, apply_plan, plan
from .text import excerpt

HOWS = (*TENSOR_HOWS, "cat", "svd")
KINDS = ("lora", "sparse", "dense")


@dataclass
class CombineReport:
    """What `combine` made. `discarded[path]` is Σ of the squared singular values dropped there
    (the squared Frobenius error of the re-factoring); `discarded_fraction` is over all targets."""

    name: str
    how: str
    kind: str
    rank: int | None
    discarded: dict[str, float] = field(default_factory=dict)
    discarded_fraction: float = 0.0


def check_options(how: str, kind: str, density: float, p: float, trim_scope: str, rank: int | None) -> None:
    if how not in HOWS:
        raise ConfigError(f"how={how!r} is not a combination method; choose one of {', '.join(HOWS)}")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is not an output kind; choose one of {', '.join(KINDS)}")
    if how in ("cat", "svd") and kind != "lora":
        raise ConfigError(f"how={how!r} produces a LoRA; use kind='lora' (or how='linear' for kind={kind!r})")
    check_density_p(density, p)
    if trim_scope not in ("tensor", "global"):
        raise ConfigError(
            f"trim={trim_scope!r}; use 'tensor' (top-k per weight) or 'global' (top-k per adapter)"
        )
    if rank is not None and not (
        isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= MAX_RANK
    ):
        raise ConfigError(f"rank={excerpt(rank)} must be a positive integer <= {MAX_RANK}")


def _check_rank(model: nn.Module, config: AdapterConfig, into: str, paths: list[str]) -> None:
    """The output LoRA's inner dimension at most min(rows, cols) of every ΔW: checked on meta-device
    twins of the modules, before any factor is allocated."""
    dry = plan(model, config, into, paths=paths, build=lambda _, module: config.make_delta(on_meta(module)))
    for path, _, delta in dry:
        inner, rows = delta.lora_A.weight.shape[0], delta.lora_B.weight.shape[0]
        cols = delta.lora_A.weight[0].numel()
        if inner > min(rows, cols):
            rank = getattr(config, "r", inner)  # a LoRA config: its rank
            raise ConfigError(
                f"rank={rank} gives inner dimension {inner} at {path!r}, larger than "
                f"min{(rows, cols)}; use rank <= {max(1, min(rows, cols) * rank // inner)}"
            )


def _global_thresholds(
    layers: list[tuple[str, AdapterLayer]], names: list[str], density: float
) -> dict[str, float]:
    """Per input: the |τ| of its ⌊density·n⌋-th largest entry over all its targets."""
    return {
        n: global_threshold([layer.deltas[n].delta_weight() for _, layer in layers], density) for n in names
    }


def _taus(layer: AdapterLayer, names: Iterable[str]) -> dict[str, Tensor]:
    return {n: layer.deltas[n].delta_weight() for n in names}


def _common_targets(model: nn.Module, names: list[str]) -> list[tuple[str, AdapterLayer]]:
    layers = [(path, layer) for path, layer in adapter_layers(model) if any(n in layer.deltas for n in names)]
    for path, layer in layers:
        missing = [n for n in names if n not in layer.deltas]
        if missing:
            raise UnsupportedModuleError(
                f"adapters {names} do not cover the same modules: {missing} have no delta at {path!r}; "
                "combine adapters trained on the same targets"
            )
    return layers


def _output_config(
    kind: str, how: str, rank: int | None, paths: list[str], inputs: list[AdapterConfig]
) -> AdapterConfig:
    """The config of the combined adapter: its deltas are built from it, and it is what is saved."""
    if kind == "dense":
        return DenseConfig(targets=paths)
    if kind == "sparse":
        return SFTConfig(targets=paths, density=1.0)
    input_ranks = [c.r for c in inputs if isinstance(c, LoRAConfig)]
    if how == "cat":
        if len({c.conv_mode for c in inputs if isinstance(c, LoRAConfig)}) > 1:
            raise UnsupportedModuleError("how='cat' needs inputs of one conv_mode; use how='svd'")
        rank = sum(input_ranks)
    elif rank is None:
        if not input_ranks:
            raise ConfigError(
                "rank=None: no input is a LoRA to take the rank from; pass rank=… (or kind='dense')"
            )
        rank = max(input_ranks)
    modes = {c.conv_mode for c in inputs if isinstance(c, LoRAConfig)}
    return LoRAConfig(
        r=rank, alpha=float(rank), targets=paths, conv_mode=modes.pop() if len(modes) == 1 else "kernel"
    )


def combine(
    model: nn.Module,
    weights: dict[str, float],
    how: str = "linear",
    into: str = "combined",
    kind: str = "lora",
    *,
    density: float = 0.2,
    trim_scope: str = "tensor",
    p: float = 0.9,
    seed: int = 0,
    rank: int | None = None,
) -> CombineReport:
    """Add adapter `into`, combining the adapters in `weights` ({name: weight}) by `how`.

    `density`: fraction kept by `ties` / `magnitude_prune` (per tensor, or per adapter with
    `trim_scope="global"`); `p`, `seed`: DARE's drop probability and mask seed; `rank`: the LoRA
    rank of the result (default: the largest input rank; `cat` makes the sum of the ranks).
    The new adapter is added inactive and frozen (`al.set_active(model, into)` to use it); on any
    error the model is unchanged.
    """
    check_options(how, kind, density, p, trim_scope, rank)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ConfigError(f"seed={excerpt(seed)} must be an integer in [0, 2**63)")
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"weights={weights!r} must be a non-empty {{adapter name: weight}} dict")
    known = adapters(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise AdapterNameError(
            f"weights name unknown adapter(s) {unknown}; adapters: {sorted(known) or 'none'}"
        )
    bad = {n: w for n, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w))}
    if bad:
        raise ConfigError(f"weights {bad} must be finite numbers")
    names = list(weights)
    layers = _common_targets(model, names)
    lora_inputs = all(isinstance(layer.deltas[n], LowRankDelta) for _, layer in layers for n in names)
    if how == "cat" and not lora_inputs:
        kinds = sorted({type(layer.deltas[n]).__name__ for _, layer in layers for n in names})
        raise UnsupportedModuleError(
            f"how='cat' concatenates LoRA factors; inputs include {kinds}. "
            "Use how='svd' (or 'linear' with kind='lora') instead"
        )
    paths = [path for path, _ in layers]
    config = _output_config(kind, how, rank, paths, [known[n] for n in names])
    rank = getattr(config, "r", None)
    if kind == "lora" and how != "cat":
        _check_rank(model, config, into, paths)
    steps = plan(model, config, into, paths=paths)
    thresholds = (
        _global_thresholds(layers, names, density)
        if trim_scope == "global" and how in ("ties", "magnitude_prune")
        else None
    )
    gen = torch.Generator().manual_seed(seed)
    report = CombineReport(into, how, kind, rank)
    total = 0.0
    for (path, layer), (_, _, out) in zip(layers, steps, strict=True):
        if kind == "lora" and not out.refactorable:
            raise UnsupportedModuleError(
                f"{path!r}: its ΔW is not one low-rank product (a grouped kernel-mode conv, or LoRA per "
                "expert on MoE weights); combine into kind='dense', or use conv_mode='reshape' conv adapters"
            )
        if how == "cat":  # kind="lora" (checked): the factors side by side, exact
            parts = [layer.deltas[n].factors() for n in names]
            b = torch.cat([w * bm for w, (bm, _) in zip(weights.values(), parts, strict=True)], dim=1)
            out.set_factors(b, torch.cat([am for _, am in parts], dim=0))
            continue
        taus = _taus(layer, weights)
        combined = combine_tensors(
            taus, weights, how, density=density, p=p, generator=gen, thresholds=thresholds
        )
        if kind == "dense":  # both setters cast
            out.weight_delta.data.copy_(combined)
            continue
        if kind != "lora":
            flat = combined.flatten()
            support = flat.nonzero().flatten()
            out.set_support(support, flat[support])
            continue
        matrix = out.matrix(combined)
        inner = out.lora_A.weight.shape[0]
        if inner > min(matrix.shape):
            raise ConfigError(
                f"rank={rank} gives inner dimension {inner} at {path!r}, larger than "
                f"min{tuple(matrix.shape)}; use rank <= {min(matrix.shape) * rank // inner}"
            )
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        root = s[:inner].sqrt()
        out.set_factors((u[:, :inner] * root).float(), (root[:, None] * vh[:inner]).float())
        report.discarded[path] = float((s[inner:] ** 2).sum())
        total += float((s**2).sum())
    if total:
        report.discarded_fraction = sum(report.discarded.values()) / total
    if isinstance(config, SFTConfig):  # kind="sparse": the config records K, the entries the result holds
        config.count = max(1, sum(out.k for _, _, out in steps))
        config.density = None
    apply_plan(model, into, steps, trainable=False, activate=False)
    return report
