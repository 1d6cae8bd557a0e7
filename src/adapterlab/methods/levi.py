"""LEVI, layer-wise ensemble of different views (Roh et al., ICML 2024): a side network of heads
on the frozen backbone's layers plus a small model trained from scratch — not a weight delta, so
it is never merged; `save` / `load` here. docs/methods/levi.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, TargetSpec, check_number, config_for, register
from ..errors import AdapterFileError, ConfigError, FingerprintMismatchError, TargetError, closest
from ..files.adapter_dir import directory_files, metadata_block, read_adapter
from ..files.atomic import write_dir_atomic
from ..files.fill import check_state, copy_state
from ..targeting import layer_stacks, logical_modules

MERGE_REFUSAL = (
    "LEVI is a side network (heads on the frozen backbone's layers plus a model trained from scratch), "
    "not a weight delta: it cannot be merged into the backbone's weights. Predict with the LEVI module "
    "itself and store it with al.levi.save"
)


@register
@dataclass
class LEVIConfig(AdapterConfig):
    """LEVI: a small side model trained from scratch, with heads on the frozen backbone's layers.

    `layer_names`: module paths (exact or dotted suffix) whose outputs feed the heads; None takes
    every layer of the backbone's layer list, `layers` (indices) keeps some of them. `vocab_size`
    (token-id input) or `input_dim` (dense input, flattened) sizes g; `layer_dims` is found from the
    backbone (its config's hidden_size, or a probe forward with `example`) and saved. `pool`: how a
    (batch, tokens, features) output becomes one vector ("mean" over unmasked tokens, or "first")."""

    method = "levi"
    side_network = True
    targets: TargetSpec = "all"  # unused: LEVI taps layers, it does not wrap modules
    num_classes: int = 2
    layer_names: list[str] | None = None
    side_dim: int = 64
    head_hidden: int = 64
    vocab_size: int | None = None
    input_dim: int | None = None
    layer_dims: list[int] | None = None
    pool: Literal["mean", "first"] = "mean"

    def validate(self) -> None:
        super().validate()
        check_number(self, "num_classes", low=1, integer=True)
        check_number(self, "side_dim", low=1, integer=True)
        check_number(self, "head_hidden", low=0, integer=True, hint="0 gives linear heads")
        for key in ("vocab_size", "input_dim"):
            if getattr(self, key) is not None:
                check_number(self, key, low=1, integer=True)
        if self.pool not in ("mean", "first"):
            raise ConfigError(f"levi: pool={self.pool!r}; use 'mean' (over unmasked tokens) or 'first' (CLS)")
        for key, kind in (("layer_names", str), ("layer_dims", int)):
            value = getattr(self, key)
            if value is not None and not (
                isinstance(value, (list, tuple))
                and value
                and all(
                    isinstance(v, kind) and not isinstance(v, bool) and (isinstance(v, str) or v > 0)
                    for v in value
                )
            ):
                raise ConfigError(
                    f"levi: {key}={value!r} must be a non-empty list of "
                    f"{'module paths' if kind is str else 'positive sizes'}"
                )
            if value is not None:
                setattr(self, key, list(value))

    def supports(self, module: nn.Module) -> str | None:
        return "LEVI is a side network around the whole model, not a per-module delta"

    def for_model(self, model: nn.Module) -> AdapterConfig:
        raise ConfigError(
            "levi is a side network around the whole model, not a per-module delta, so al.inject cannot "
            "add it; build it with al.levi.LEVI(model, num_classes=..., layer_names=[...])"
        )


def _layer_paths(backbone: nn.Module, config: LEVIConfig) -> list[str]:
    modules = [p for p, _ in logical_modules(backbone) if p]
    if config.layer_names is None:
        stacks = layer_stacks(backbone)
        if not stacks:
            raise ConfigError(
                f"levi: {type(backbone).__name__} has no numbered layer list; pass layer_names=[...] "
                f"(module paths such as {modules[:6]})"
            )
        paths = max(stacks.values(), key=len)
        if config.layers is not None:
            bad = [i for i in config.layers if i >= len(paths)]
            if bad:
                raise ConfigError(
                    f"levi: layers={config.layers} is out of range; the backbone has {len(paths)} layers "
                    f"(0..{len(paths) - 1})"
                )
            paths = [paths[i] for i in config.layers]
        return paths
    found = []
    for name in config.layer_names:
        hits = [p for p in modules if p == name or p.endswith("." + name)]
        if len(hits) != 1:
            what = (
                "matches no module"
                if not hits
                else f"matches {len(hits)} modules {hits[:4]}; give a longer path"
            )
            raise TargetError(f"levi: layer name {name!r} {what} (closest: {closest(name, modules)})")
        found.append(hits[0])
    return found


class _Enough(Exception):
    """Raised by the last layer hook: the rest of the backbone is not needed."""


class TokenSide(nn.Module):
    """g for token ids: mean of embeddings over unmasked tokens, then an MLP."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        e = self.embed(ids)
        m = torch.ones(ids.shape, device=ids.device) if mask is None else mask.to(e.dtype)
        return self.mlp((e * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1))


class DenseSide(nn.Module):
    """g for a dense input: flattened, then a two-layer MLP."""

    def __init__(self, input_dim: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.mlp(x.flatten(1).float())


def pool(h: Any, mask: Tensor | None, how: str) -> Tensor:
    """One vector per sample from a layer output: (B, F) as is; (B, T, F) by masked mean or first
    token; (B, C, *spatial) by the mean over spatial positions. Tuples use their first element."""
    if isinstance(h, (tuple, list)):
        h = h[0]
    if h.dim() == 2:
        return h
    if h.dim() == 3:
        if how == "first":
            return h[:, 0]
        if mask is not None and tuple(mask.shape) == tuple(h.shape[:2]):
            m = mask.to(h.dtype)[..., None]
            return (h * m).sum(1) / m.sum(1).clamp(min=1)
        return h.mean(1)
    return h.flatten(2).mean(-1)


class LEVI(nn.Module):
    """A frozen `backbone`, a side model `side` (g), one head per tapped layer and the mixing
    logits `mix`. `forward` takes what the backbone takes and returns the ensemble's logits; g reads
    the first positional argument or `input_ids` / `pixel_values` / `x`, with `attention_mask`."""

    def __init__(
        self, backbone: nn.Module, config: LEVIConfig | None = None, example: Any = None, **options: Any
    ) -> None:
        super().__init__()
        given = config_for(config or "levi", **options)
        if not isinstance(given, LEVIConfig):
            raise ConfigError(f"levi: got a {given.method!r} config; pass a LEVIConfig or LEVI options")
        config = dataclasses.replace(given)  # filled in below; the caller's object stays as it was
        self.backbone = backbone.requires_grad_(False).eval()
        self.taps = _layer_paths(backbone, config)
        self.config = config
        hf: Any = getattr(backbone, "config", None)
        if config.vocab_size is None and config.input_dim is None:
            if getattr(hf, "vocab_size", None) is None:
                raise ConfigError(
                    "levi: pass vocab_size= (token-id input) or input_dim= (dense input) to size the "
                    "side model"
                )
            config.vocab_size = int(hf.vocab_size)
        if config.layer_dims is None:
            config.layer_dims = self._find_dims(hf, example)
        if len(config.layer_dims) != len(self.taps):
            raise ConfigError(
                f"levi: layer_dims={config.layer_dims} has {len(config.layer_dims)} sizes for "
                f"{len(self.taps)} layers {self.taps}"
            )
        if config.layer_names is None:
            config.layer_names = list(self.taps)
        d = config.side_dim
        self.side = (
            TokenSide(config.vocab_size, d)
            if config.vocab_size is not None
            else DenseSide(config.input_dim, d)  # type: ignore[arg-type]  # set if vocab_size is not
        )
        self.heads = nn.ModuleList(self._head(h + d) for h in config.layer_dims)
        self.mix = nn.Parameter(torch.zeros(len(self.taps)))
        self.merge_refusal = MERGE_REFUSAL  # read by al.merge

    def _head(self, width: int) -> nn.Module:
        c, hidden = self.config.num_classes, self.config.head_hidden
        if hidden == 0:
            return nn.Linear(width, c)
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, c))

    def _find_dims(self, hf: Any, example: Any) -> list[int]:
        if example is not None:  # a probe forward: a positional input, or a dict of keyword inputs
            feats = (
                self.layer_features(**example) if isinstance(example, dict) else self.layer_features(example)
            )
            return [f.shape[-1] for f in feats]
        if getattr(hf, "hidden_size", None) is not None:
            return [int(hf.hidden_size)] * len(self.taps)
        raise ConfigError(
            "levi: cannot tell the tapped layers' output sizes; pass layer_dims=[...] or example=<an input>"
        )

    def train(self, mode: bool = True) -> LEVI:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, batch-norm statistics unchanged
        return self

    @torch.no_grad()
    def layer_features(self, *args: Any, **kwargs: Any) -> list[Tensor]:
        """The pooled outputs of the tapped layers for one input (the backbone runs only as far
        as the deepest tapped layer)."""
        mask = kwargs.get("attention_mask")
        modules = dict(logical_modules(self.backbone))
        captured: dict[str, Tensor] = {}

        def hook(path: str):
            def fn(_module: nn.Module, _inputs: Any, output: Any) -> None:
                captured[path] = pool(output, mask, self.config.pool).float()
                if len(captured) == len(self.taps):
                    raise _Enough

            return fn

        handles = [modules[p].register_forward_hook(hook(p)) for p in self.taps]
        try:
            self.backbone(*args, **kwargs)
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [p for p in self.taps if p not in captured]
        if missing:
            raise TargetError(
                f"levi: layer(s) {missing} did not run in the backbone's forward; tap layers it uses"
            )
        return [captured[p] for p in self.taps]

    def raw_input(self, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        if args:
            return args[0]
        for key in ("input_ids", "pixel_values", "x"):
            if kwargs.get(key) is not None:
                return kwargs[key]
        raise ConfigError(
            f"levi: no input for the side model; pass it first or as input_ids=/pixel_values=/x= "
            f"(got keyword arguments {sorted(kwargs)})"
        )

    def forward(
        self, *args: Any, return_heads: bool = False, **kwargs: Any
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Ensemble logits (B, num_classes); with `return_heads`, also each head's logits (L, B, C)."""
        feats = self.layer_features(*args, **kwargs)
        g = self.side(self.raw_input(args, kwargs), kwargs.get("attention_mask"))
        heads = torch.stack(
            [head(torch.cat([h, g], dim=-1)) for head, h in zip(self.heads, feats, strict=True)]
        )
        logits = torch.einsum("l,lbc->bc", torch.softmax(self.mix, 0), heads)
        return (logits, heads) if return_heads else logits

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Everything LEVI trains (g, heads, mixing logits): what `save` writes."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def fingerprint(self) -> dict[str, Any]:
        modules = dict(logical_modules(self.backbone))
        return {
            "backbone": type(self.backbone).__name__,
            "layers": {p: type(modules[p]).__name__ for p in self.taps},
        }


def save(levi: LEVI, directory: str | os.PathLike) -> Path:
    """Write LEVI's trained parts to `directory` (adapter_model.safetensors + adapter_config.json,
    replaced atomically); the backbone is not written."""
    if not isinstance(levi, LEVI):
        raise ConfigError(
            f"levi.save needs a LEVI module, got {type(levi).__name__}; use al.save for weight deltas"
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in levi.adapter_state_dict().items()}
    return write_dir_atomic(
        Path(directory), directory_files(tensors, metadata_block(levi.config, levi.fingerprint()))
    )


def load(backbone: nn.Module, directory: str | os.PathLike) -> LEVI:
    """A LEVI around `backbone` with the parts saved in `directory`; its shapes are checked on a
    LEVI built on the meta device first."""
    metadata, tensors = read_adapter(directory)
    if metadata["method"] != "levi":
        raise AdapterFileError(
            f"{str(directory)!r} holds a {metadata['method']!r} adapter, not LEVI; load it with al.load"
        )
    config = AdapterConfig.from_dict(metadata["config"])
    assert isinstance(config, LEVIConfig)  # the method is "levi" (checked above)
    expected = metadata["fingerprint"].get("layers", {})
    modules = dict(logical_modules(backbone))
    wrong = [
        f"{p!r} ({'missing' if p not in modules else type(modules[p]).__name__}, saved with {t})"
        for p, t in expected.items()
        if p not in modules or type(modules[p]).__name__ != t
    ]
    if wrong:
        raise FingerprintMismatchError(
            f"{str(directory)!r} was saved for another backbone: {'; '.join(wrong[:5])}. "
            "Load it onto the backbone it was trained with"
        )
    with torch.device("meta"):
        dry = LEVI(backbone, config)
    check_state(dry.adapter_state_dict(), tensors, repr(str(directory)))
    levi = LEVI(backbone, config)
    copy_state(levi.adapter_state_dict(), tensors)
    return levi
