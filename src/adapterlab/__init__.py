"""adapterlab: parameter-efficient fine-tuning where every method is a weight delta beside a frozen base.

import adapterlab as al
model = al.inject(model, "lora", r=16, alpha=32, targets="all-linear")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterFileError,
    AdapterlabError,
    AdapterNameError,
    ConfigError,
    FingerprintMismatchError,
    HotswapError,
    MergeError,
    RoutingError,
    StorageError,
    TargetError,
    UnknownMethodError,
    UnsupportedModuleError,
)
from .version import VERSION as __version__

# Everything else loads on first use (PEP 562), so `import adapterlab` and `adapterlab --help` do not
# import torch. The TYPE_CHECKING block below states the same names for type checkers and the docs.
_SUBMODULES = {
    "experts": ".experts",
    "losses": ".losses",
    "methods": ".methods",
    "hft": ".methods.hft",
    "levi": ".methods.levi",
    "locft": ".methods.locft",
    "sara": ".methods.sara",
    "sft": ".methods.sft",
}
_NAMES = {
    ".compose": ("CombineReport", "combine"),
    ".config": ("AdapterConfig", "config_for"),
    ".hotswap": ("hotswap", "prepare_hotswap"),
    ".io": ("load", "save"),
    ".methods.hft": ("HFTConfig",),
    ".methods.levi": ("LEVIConfig",),
    ".methods.locft": ("LocFTConfig",),
    ".methods.lora": ("ConvLoRAConfig", "LoRAConfig"),
    ".methods.sara": ("SaRAConfig",),
    ".methods.sft": ("SFTConfig", "train_lt_sft"),
    ".methods.sparse": ("SparseDelta",),
    ".model": (
        "active",
        "adapters",
        "after_step",
        "before_step",
        "delete",
        "dequantize",
        "disabled",
        "inject",
        "merge",
        "routing",
        "set_active",
        "trainable_summary",
        "unload",
        "unmerge",
    ),
}
_LAZY = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(_SUBMODULES[name], __name__)
    elif name in _LAZY:
        importlib.import_module(".methods", __name__)  # registers every method
        module = importlib.import_module(_LAZY[name], __name__)
        # all of the module's names at once: importing `.hotswap` made `hotswap` the submodule
        globals().update({n: getattr(module, n) for n in _NAMES[_LAZY[name]]})
        return globals()[name]
    else:
        raise AttributeError(f"module 'adapterlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_LAZY})


if TYPE_CHECKING:
    from . import experts, losses, methods  # noqa: F401  (re-exported)
    from .compose import CombineReport, combine
    from .config import AdapterConfig, config_for
    from .hotswap import hotswap, prepare_hotswap
    from .io import load, save
    from .methods import hft, levi, locft, sara, sft
    from .methods.hft import HFTConfig
    from .methods.levi import LEVIConfig
    from .methods.locft import LocFTConfig
    from .methods.lora import ConvLoRAConfig, LoRAConfig
    from .methods.sara import SaRAConfig
    from .methods.sft import SFTConfig, train_lt_sft
    from .methods.sparse import SparseDelta
    from .model import (
        active,
        adapters,
        after_step,
        before_step,
        delete,
        dequantize,
        disabled,
        inject,
        merge,
        routing,
        set_active,
        trainable_summary,
        unload,
        unmerge,
    )


__all__ = [
    "active",
    "after_step",
    "before_step",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterlabError",
    "AdapterNameError",
    "adapters",
    "combine",
    "CombineReport",
    "config_for",
    "ConfigError",
    "ConvLoRAConfig",
    "delete",
    "dequantize",
    "disabled",
    "FingerprintMismatchError",
    "inject",
    "load",
    "LoRAConfig",
    "merge",
    "MergeError",
    "routing",
    "RoutingError",
    "save",
    "set_active",
    "StorageError",
    "TargetError",
    "trainable_summary",
    "UnknownMethodError",
    "unload",
    "unmerge",
    "UnsupportedModuleError",
    "__version__",
    "hft",
    "HFTConfig",
    "losses",
    "levi",
    "LEVIConfig",
    "locft",
    "LocFTConfig",
    "sara",
    "SaRAConfig",
    "sft",
    "SFTConfig",
    "SparseDelta",
    "train_lt_sft",
    "hotswap",
    "HotswapError",
    "prepare_hotswap",
]
