"""adapterlab: parameter-efficient fine-tuning where every method is a weight delta beside a frozen base.

    import adapterlab as al
    model = al.inject(model, "lora", r=16, alpha=32, targets="all-linear")
"""
from . import methods  # noqa: F401  (registers the methods)
from .config import AdapterConfig, config_for
from .errors import (
    AdapterFileError,
    AdapterlabError,
    AdapterNameError,
    ConfigError,
    FingerprintMismatchError,
    MergeError,
    TargetError,
    UnknownMethodError,
    UnsupportedModuleError,
)
from .io import VERSION as __version__
from .io import load, save
from .methods.lora import ConvLoRAConfig, LoRAConfig
from .model import (
    active,
    adapters,
    delete,
    disabled,
    inject,
    merge,
    set_active,
    trainable_summary,
    unload,
    unmerge,
)

__all__ = [
    "AdapterConfig", "AdapterFileError", "AdapterNameError", "AdapterlabError", "ConfigError", "ConvLoRAConfig",
    "FingerprintMismatchError", "LoRAConfig", "MergeError", "TargetError", "UnknownMethodError",
    "UnsupportedModuleError", "__version__", "active", "adapters", "config_for", "delete", "disabled", "inject",
    "load", "merge", "save", "set_active", "trainable_summary", "unload", "unmerge",
]
