"""The one way a file's tensors become a delta: built first on the meta device with the adapter's
own config, so every shape is checked before anything is allocated, then built and filled.
Used by `al.load`, `AdapterFile.delta` (the CLI's merge, export, validate) and LEVI's load.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import AdapterFileError, AdapterlabError
from ..layer import Delta


def on_meta(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose parameters and buffers are on the meta device (shapes, no
    memory): a delta built from it allocates nothing."""
    twin = copy.copy(module)
    twin.__dict__["_parameters"] = {
        k: None if p is None else nn.Parameter(p.detach().to("meta"), p.requires_grad)
        for k, p in module._parameters.items()
    }
    twin.__dict__["_buffers"] = {k: None if b is None else b.to("meta") for k, b in module._buffers.items()}
    return twin


def _describe(config: AdapterConfig) -> str:
    """e.g. "LoRA r=8 alpha=16.0 …": the config's class and the settings that size its deltas."""
    settings = " ".join(f"{k}={v}" for k, v in config.settings().items())
    return f"{type(config).__name__.removesuffix('Config')} {settings}".strip()


def check_state(state: dict[str, Tensor], tensors: dict[str, Tensor], where: str, hint: str = "") -> None:
    """`tensors` must be exactly the keys of `state`, each of the same shape and kind (float or not)."""
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise AdapterFileError(
            f"{where} does not fit: missing tensors {missing[:5]}, unexpected {unexpected[:5]}"
            f"{hint}; re-save the adapter or load it into the model it was made for"
        )
    for key, target in state.items():
        given = tensors[key]
        if given.shape != target.shape or given.is_floating_point() != target.is_floating_point():
            raise AdapterFileError(
                f"{where}: tensor {key!r} has shape {list(given.shape)} ({given.dtype}); this "
                f"model needs shape {list(target.shape)} ({target.dtype}){hint}"
            )


@torch.no_grad()
def copy_state(state: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
    for key, target in state.items():
        target.copy_(tensors[key])


def _build(config: AdapterConfig, module: nn.Module, tensors: dict[str, Tensor], path: str) -> Delta:
    return config.loaded_delta(module, config.delta_at(path, module), tensors)


def fill_delta(
    config: AdapterConfig, module: nn.Module, tensors: dict[str, Tensor], where: str, path: str = ""
) -> Delta:
    """The delta of `config` for `module` (at model path `path`), holding `tensors` (keys as in its
    state_dict). `where` names the module in errors (every one an `AdapterFileError`)."""
    hint = f" ({_describe(config)})"
    try:
        dry = _build(config, on_meta(module), tensors, path)
    except AdapterlabError as e:
        raise AdapterFileError(f"{where} does not fit: {e}") from None
    except (NotImplementedError, RuntimeError):
        dry = None  # a build that reads weight values (SaRA's mask, a norm's probe): sized by the module
    except (TypeError, ValueError, IndexError, OverflowError) as e:
        raise AdapterFileError(f"{where} cannot be built{hint}: {' '.join(str(e).split())[:200]}") from None
    if dry is not None:
        check_state(dry.state_dict(), tensors, where, hint)
    try:
        delta = _build(config, module, tensors, path)
    except AdapterlabError as e:
        raise AdapterFileError(f"{where} does not fit: {e}") from None
    except (RuntimeError, TypeError, ValueError, IndexError, OverflowError, MemoryError) as e:
        # sizes torch cannot hold (an overflowing shape, an allocation that fails): never raw
        raise AdapterFileError(f"{where} cannot be built{hint}: {' '.join(str(e).split())[:200]}") from None
    check_state(delta.state_dict(), tensors, where, hint)
    copy_state(delta.state_dict(), tensors)
    return delta


def filler(
    config: AdapterConfig, owned: dict[str, dict[str, Tensor]], where: Callable[[str], str]
) -> Callable[[str, nn.Module], Delta]:
    """`fill_delta` per module path, for `model.plan(..., build=…)`."""
    return lambda path, module: fill_delta(config, module, owned[path], where(path), path)
