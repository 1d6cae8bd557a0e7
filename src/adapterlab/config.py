"""Adapter configurations: one dataclass per method, a registry by method name, JSON round-trip.
A config class is also where a method declares itself to the rest of the library (PEFT mapping,
what `inspect` shows, side network or deltas, train-end hook). docs/architecture.md has the list.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import Tensor, nn

from .errors import AdapterFileError, ConfigError, HotswapError, UnknownMethodError
from .text import excerpt

if TYPE_CHECKING:
    from .layer import Delta

TargetSpec = str | list[str]
_REGISTRY: dict[str, type[AdapterConfig]] = {}
C = TypeVar("C", bound="type[AdapterConfig]")


def register(cls: C) -> C:
    """Class decorator: make a config class reachable by its `method` name."""
    if not cls.method or cls.method in _REGISTRY:
        raise ConfigError(f"cannot register {cls.__name__}: method name {cls.method!r} is empty or taken")
    _REGISTRY[cls.method] = cls
    return cls


def registry() -> dict[str, type[AdapterConfig]]:
    """{method name: config class}. Importing `adapterlab.methods` registers them; `import adapterlab`
    is lazy (the CLI starts without torch), so the first lookup imports it."""
    importlib.import_module("adapterlab.methods")
    return _REGISTRY


def peft_config_class(peft_type: Any) -> type[AdapterConfig] | None:
    """The config class that reads PEFT's `peft_type`, or None."""
    return next(
        (cls for cls in registry().values() if cls.peft_type is not None and cls.peft_type == peft_type), None
    )


def methods() -> list[str]:
    """Registered method names."""
    return sorted(registry())


def config_class(method: str) -> type[AdapterConfig]:
    try:
        return registry()[method.lower()]
    except (KeyError, AttributeError):
        raise UnknownMethodError(
            f"unknown method {excerpt(method)}; choose one of {', '.join(methods())}"
        ) from None


def config_for(method: str | AdapterConfig, **kwargs: Any) -> AdapterConfig:
    """A config from a method name and keyword arguments, or a given config (then no kwargs)."""
    if isinstance(method, AdapterConfig):
        if kwargs:
            raise ConfigError(
                f"got a config object and keyword arguments {sorted(kwargs)}; "
                "set the fields on the config (dataclasses.replace) instead"
            )
        method.validate()
        return method
    cls = config_class(method)
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)} for method {cls.method!r}; "
            f"valid options: {', '.join(f.name for f in dataclasses.fields(cls))}"
        )
    return cls(**kwargs)


def _check_spec(field: str, spec: Any, allow_none: bool) -> None:
    if spec is None and allow_none:
        return
    if isinstance(spec, str):
        if spec not in KEYWORDS:
            try:
                re.compile(spec)
            except (re.error, RecursionError, OverflowError) as e:  # deep nesting, huge repeat counts
                raise ConfigError(
                    f"{field}={excerpt(spec)} is not a valid regular expression ({excerpt(str(e))})"
                ) from None
        return
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) and s for s in spec):
        return
    raise ConfigError(
        f"{field}={excerpt(spec)} is not a target spec; use a non-empty list of module names, a regex string, "
        f"or one of {', '.join(repr(k) for k in KEYWORDS)}"
    )


KEYWORDS = ("all-linear", "all-conv", "all", "all-experts")  # all-experts: stacked MoE weights (experts.py)


@dataclass
class AdapterConfig:
    """Fields every method shares: which modules to adapt.

    targets: a list of module names (each matching exactly or as a dotted suffix), a regex
      (full match against the module's dotted name), "all-linear" (every Linear / HF Conv1D except
      the output head), "all-conv" (every Conv1d/2d/3d) or "all" (both).
    exclude: same forms, removed from what `targets` selected.
    layers: keep only modules whose name holds one of these layer indices (`model.layers.3.…`).
    """

    method: ClassVar[str] = ""
    # a network around the whole model (LEVI), not deltas on modules: it cannot be merged or combined
    side_network: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None  # PEFT's name for the method, where PEFT can express it
    summary_fields: ClassVar[tuple[str, ...]] = ()  # the fields `adapterlab inspect` shows as settings
    targets: TargetSpec = "all-linear"
    exclude: TargetSpec | None = None
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad field. Subclasses extend it."""
        _check_spec("targets", self.targets, allow_none=False)
        _check_spec("exclude", self.exclude, allow_none=True)
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = [self.layers]
            if not (
                isinstance(self.layers, (list, tuple))
                and self.layers
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
            ):
                raise ConfigError(
                    f"layers={excerpt(self.layers)} must be a non-empty list of layer indices >= 0"
                )
            self.layers = list(self.layers)

    # -- what a method must provide -------------------------------------------------------------
    def supports(self, module: nn.Module) -> str | None:
        """None if this method can wrap `module`, else the reason it cannot."""
        raise NotImplementedError

    def make_delta(self, module: nn.Module) -> Delta:
        """A fresh delta for `module`; raise `UnsupportedModuleError` if the layout cannot work."""
        raise NotImplementedError

    def delta_at(self, path: str, module: nn.Module) -> Delta:
        """The delta for `module` at model path `path`: `make_delta(module)`, unless a method sizes
        deltas per path (LoRA's `rank_pattern` / `alpha_pattern`). Inject and load both call this."""
        return self.make_delta(module)

    def loaded_delta(self, module: nn.Module, built: Delta, tensors: dict[str, Tensor]) -> Delta:
        """The delta `load` copies `tensors` into (this module's tensors from the file, keyed as in
        the delta's state_dict); `built` is `delta_at(path, module)`. Methods whose delta sizes or kinds
        come from training (a sparse support, a dense head) return one that fits the tensors, or
        raise an `AdapterlabError` saying why none can. The default is `built`."""
        return built

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """The config `inject` applies to `model`. A method whose targets depend on the model (HFT's
        seeded half, LocFT's layer) returns a copy with `targets` the exact module paths, so the
        saved config names them; others return self."""
        return self

    # -- training schedule (al.before_step / al.after_step; AdapterCallback) ----------------------
    def before_step(self, model: nn.Module, name: str, step: int) -> None:
        """Between backward and the optimizer step `step` (0-based) of adapter `name`: a method
        adds gradient terms or masks gradients here. Never adds or reshapes parameters, so
        optimizers, DDP and checkpoint resume keep working. Default: nothing."""

    def after_step(self, model: nn.Module, name: str, step: int, optimizer: Any | None) -> None:
        """After optimizer step `step`: a method switches phases or re-selects masks here (resetting
        `optimizer`'s state for the parameters it re-purposes). Default: nothing."""

    def train_end(self, model: nn.Module, name: str, step: int) -> None:
        """When a Trainer run ends after `step` steps (`AdapterCallback`): a method turns a training
        form into its final one here (LT-SFT: dense phase into sparse deltas). Default: nothing."""

    # -- hot-swap: al.prepare_hotswap, al.hotswap ---------------------------------------------------
    def pad_for_hotswap(self, deltas: dict[str, Delta], max_rank: int, name: str) -> None:
        """Make room in adapter `name`'s `deltas` ({path: delta}) for hot-swapping up to rank `max_rank` (LoRA:
        zero padding, ΔW unchanged). Default: refused, the shapes do not depend on a rank."""
        raise HotswapError(
            f"prepare_hotswap pads LoRA ranks; adapter {name!r} is {self.method!r}, whose shapes "
            "do not depend on a rank: hot-swap it directly with al.hotswap (same shapes needed)"
        )

    def hotswap_refusal(self, loaded: AdapterConfig, deltas: list[Delta]) -> str | None:
        """Why a saved adapter of config `loaded` cannot be written into these deltas, or None."""
        return None

    def hotswap_values(
        self, where: str, path: str, delta: Delta, own: dict[str, Tensor], loaded: AdapterConfig
    ) -> list[tuple[Tensor, Tensor]] | None:
        """(target, value) pairs writing a file's tensors `own` into `delta` in place, checked; None
        (the default): equal shapes, copied as they are."""
        return None

    # -- files: PEFT's format, `adapterlab inspect` --------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The hyper-parameters `adapterlab inspect` shows."""
        return {k: getattr(self, k) for k in self.summary_fields}

    def file_tensors(
        self, tensors: dict[str, Tensor], modules: dict[str, dict[str, Any]]
    ) -> dict[str, Tensor]:
        """The deltas' tensors (keys `<path>.<key>`) as the file stores them, given the fingerprint
        `modules`; `native_tensors` undoes it on reading. Default: as they are."""
        return tensors

    @classmethod
    def native_tensors(
        cls, tensors: dict[str, Tensor], modules: dict[str, dict[str, Any]], where: str
    ) -> dict[str, Tensor]:
        """A file's tensors (keys relative to `base_model.model.`) keyed and shaped as the deltas'
        state dicts. Default: as they are."""
        return tensors

    def to_peft(self, paths: list[str], deltas: list[Delta]) -> dict[str, Any] | None:
        """PEFT's config fields for this adapter's deltas at `paths`, or None if PEFT cannot express it."""
        return None

    def peft_refusal(self) -> str:
        """Why PEFT's format cannot hold this adapter (when `to_peft` gave None)."""
        return f"holds a {self.method!r} adapter; PEFT's LoRA format holds LoRA only"

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """Our config dict for PEFT's config `data` (of this class's `peft_type`)."""
        raise AdapterFileError(f"{where}: adapterlab reads no PEFT {cls.method!r} adapters")

    @classmethod
    def peft_modules(
        cls, data: dict[str, Any], tensors: dict[str, Tensor], where: str
    ) -> dict[str, dict[str, Any]]:
        """Fingerprint entries {path: {type, shape}} of a PEFT directory, from its tensors' shapes
        (PEFT stores no fingerprint); tensor keys are relative to the model (no prefix)."""
        raise AdapterFileError(
            f"{where}: the metadata holds no fingerprint of the {cls.method!r} adapter's modules; "
            "re-save the adapter"
        )

    @classmethod
    def peft_inferred(
        cls, tensors: dict[str, Tensor], alphas: dict[str, float], where: str
    ) -> dict[str, Any] | None:
        """PEFT's config fields for a diffusers LoRA file that stores none, inferred from its
        tensors (keyed `<module>.<key>`) and network `alphas` {module: α} as diffusers infers
        them; None when the tensors are not this method's (default)."""
        return None

    @classmethod
    def peft_base_entry(
        cls, entry: dict[str, Any], base_shape: list[int], conv1d: bool | None
    ) -> dict[str, Any]:
        """A PEFT directory's fingerprint entry (guessed by `peft_modules`, without the model) fixed
        by the base weight's shape, as loading into the model would decide it: `conv1d` says whether
        the checkpoint's architecture stores linear weights (in, out) (None: unknown). Default: as is."""
        return entry

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any], strict: bool = True) -> AdapterConfig:
        """Inverse of `to_dict`. Every field is checked by the config's `validate` (types, ranges);
        bad values raise `ConfigError`. Unknown keys raise `ConfigError` too, unless `strict=False`
        (configs read from files): then they are dropped with a warning naming them."""
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            raise ConfigError(
                f"an adapter config must be a JSON object with a 'method' string, got {excerpt(data, 200)}"
            )
        cls = config_class(data["method"])
        fields = {k: v for k, v in data.items() if k != "method"}
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)}, key=str)
        if unknown and not strict:
            warnings.warn(
                f"ignoring unknown key(s) {excerpt(unknown)} in a {cls.method!r} config "
                "(written by a newer adapterlab?)",
                UserWarning,
                stacklevel=2,
            )
            fields = {k: v for k, v in fields.items() if k not in unknown}
        try:
            return config_for(cls.method, **fields)
        except TypeError as e:  # a value of the wrong type deep inside a dataclass
            raise ConfigError(
                f"bad config for method {excerpt(data['method'])}: {excerpt(str(e), 200)}"
            ) from None


def check_number(
    cfg: AdapterConfig,
    name: str,
    *,
    low: float,
    high: float = float("inf"),
    low_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> None:
    """Range/type check for one numeric field, with a message that names the value and the range."""
    value = getattr(cfg, name)
    kind = int if integer else (int, float)
    ok = (
        isinstance(value, kind)
        and not isinstance(value, bool)
        # ints too: a float field must convert to a finite float, an integer one fit in int64
        and (abs(value) < 2**63 if integer or high < 2**63 else abs(value) < 2**1023)
        and (isinstance(value, int) or math.isfinite(value))
    )
    if ok:  # (NaN and ±inf fail above: from a file they would poison every weight they touch)
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        rng = f"{bracket}{low}, {high}]" if high != float("inf") else f"{'>' if low_open else '>='} {low}"
        raise ConfigError(
            f"{cfg.method}: {name}={excerpt(value)} is out of range; it must be {'an integer' if integer else 'a number'} "
            f"{rng}{'. ' + hint if hint else ''}"
        )
