"""adapterlab: parameter-efficient fine-tuning where every method is a weight delta beside a frozen base.

import adapterlab as al
model = al.inject(model, "lora", r=16, alpha=32, targets="all-linear")
"""

from . import experts, losses, methods  # noqa: F401  (methods registers the methods)
from .compose import CombineReport, combine
from .config import AdapterConfig, config_for
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
from .version import VERSION as __version__

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
