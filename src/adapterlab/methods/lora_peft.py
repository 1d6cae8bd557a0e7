"""PEFT's LoRA file format: LoraConfig fields both ways, the modules a PEFT directory's tensors
describe, Linear vs Conv1D decided as `al.load` decides it, and PEFT's rank/alpha patterns.
`LoRAConfig` (lora.py) delegates here; expert weights (`target_parameters`) are lora_experts.py's."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from torch import Tensor, nn

from ..errors import AdapterFileError, ConfigError, TargetError, closest
from ..targeting import find_targets
from ..text import excerpt
from .lora_experts import peft_target_parameters, peft_targets

# LoraConfig fields that change what a LoRA computes or holds, and that adapterlab does not read
PEFT_UNSUPPORTED: dict[str, Any] = {
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "megatron_config": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "lora_ga_config": None,
}
# init_lora_weights values that change the base weights (the adapter is only right on that changed base)
PEFT_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_PEFT_KEY = re.compile(
    r"(?P<path>.+)\.(?P<key>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
)


def lora_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    """LoRAConfig fields from PEFT's LoraConfig dict; features we do not read are refused by name."""
    used = [
        k
        for k, default in PEFT_UNSUPPORTED.items()
        if data.get(k, default) not in (default, None, {}, [], False)
    ]
    if data.get("bias", "none") != "none":
        used.append(f"bias={excerpt(data['bias'], 50)}")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(PEFT_BASE_CHANGING_INITS):
        used.append(f"init_lora_weights={excerpt(init, 50)} (it changes the base weights)")
    if used:
        raise AdapterFileError(f"{where} uses PEFT LoRA features adapterlab does not read: {used}")
    return {
        **peft_targets(data, where),
        "method": "lora",
        "r": data.get("r"),
        "alpha": data.get("lora_alpha"),
        "dropout": data.get("lora_dropout", 0.0),
        "rslora": data.get("use_rslora", False),
        "use_dora": False if data.get("use_dora") is None else data["use_dora"],
        "rank_pattern": data.get("rank_pattern") or None,
        "alpha_pattern": data.get("alpha_pattern") or None,
        "modules_to_save": data.get("modules_to_save") or None,
    }


def peft_fields(config: Any, paths: list[str], deltas: list[Any]) -> dict[str, Any] | None:
    """PEFT's LoraConfig for a LoRAConfig's deltas at `paths`, or None if PEFT cannot load them."""
    if not all(getattr(d, "peft_compatible", False) for d in deltas):
        return None
    saved = [p for p, d in zip(paths, deltas, strict=True) if type(d).__name__ == "SavedModule"]
    lora = [(p, d) for p, d in zip(paths, deltas, strict=True) if p not in saved]
    module_paths, params = peft_target_parameters([p for p, _ in lora], [d for _, d in lora])
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": config.use_dora,
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
        # a regex PEFT full-matches: exactly these modules (a list would also match dotted suffixes)
        "target_modules": "^(?:" + "|".join(re.escape(p) for p in module_paths) + ")$"
        if module_paths
        else [],
        **({"target_parameters": params} if params else {}),
        "fan_in_fan_out": any(getattr(d, "transposed", False) and d.lora_A.weight.dim() == 2 for d in deltas),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": saved or None,
    }


# -- rank_pattern / alpha_pattern -----------------------------------------------------------------
def _pattern_matches(key: str, path: str) -> bool:
    """PEFT's rule: `key` matches the whole path or a dotted suffix of it, as a regex."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


def pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """The value of the first pattern (in order) matching `path`, else `default`."""
    for key, value in (patterns or {}).items():
        if _pattern_matches(key, path):
            return value
    return default


def check_patterns(config: Any, max_rank: int) -> None:
    """`rank_pattern` {regex: int in [1, max_rank]}, `alpha_pattern` {regex: number > 0}, or None."""
    for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = getattr(config, name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or len(patterns) > 10_000:
            raise ConfigError(
                f"{config.method}: {name}={excerpt(patterns)} must be a dict {{module pattern: value}} (or None)"
            )
        for key, value in patterns.items():
            try:
                ok_key = isinstance(key, str) and bool(key) and re.compile(rf"(.*\.)?({key})$") is not None
            except (re.error, RecursionError, OverflowError):
                ok_key = False
            if not ok_key:
                raise ConfigError(
                    f"{config.method}: {name} key {excerpt(key)} is not a non-empty regular expression; "
                    "use a module name such as 'q_proj' or 'layers.0.mlp.down_proj'"
                )
            kind = int if integer else (int, float)
            good = isinstance(value, kind) and not isinstance(value, bool)
            if good and integer:
                good = 1 <= value <= max_rank
            elif good:
                good = math.isfinite(value) and value > 0
            if not good:
                want = f"an integer rank in [1, {max_rank}]" if integer else "a number > 0"
                raise ConfigError(
                    f"{config.method}: {name}[{excerpt(key, 80)}]={excerpt(value)} must be {want}"
                )


def for_model(config: Any, model: nn.Module) -> Any:
    """`LoRAConfig.for_model`: patterns checked against the targets; with `modules_to_save`, a copy
    whose targets are the exact paths (LoRA's, then the saved modules') and modules_to_save too."""
    lora_config = dataclasses.replace(config, modules_to_save=None)
    paths = [path for path, _ in find_targets(model, lora_config)]
    require_patterns_used(config, paths)
    if not config.modules_to_save:
        return config
    only = dataclasses.replace(lora_config, targets=config.modules_to_save, exclude=None, layers=None)
    saved = [path for path, _ in find_targets(model, only)]
    both = sorted(set(saved) & set(paths))
    if both:
        raise ConfigError(
            f"{config.method}: {both[:3]} are both LoRA targets and modules_to_save; a module is either "
            "adapted or saved whole: add it to `exclude`, or drop it from modules_to_save"
        )
    return dataclasses.replace(
        config, targets=paths + saved, exclude=None, layers=None, modules_to_save=saved
    )


def check_saved(config: Any) -> None:
    """`modules_to_save`: None or a non-empty list of module names."""
    if isinstance(config.modules_to_save, tuple):
        config.modules_to_save = list(config.modules_to_save)
    saved = config.modules_to_save
    if saved is not None and not (
        isinstance(saved, list) and saved and all(isinstance(n, str) and n for n in saved)
    ):
        raise ConfigError(
            f"{config.method}: modules_to_save={excerpt(saved)} must be a non-empty list of module names "
            "(e.g. ['lm_head']) or None"
        )


def require_patterns_used(config: Any, paths: list[str]) -> None:
    """Each rank/alpha pattern matches at least one of the targeted `paths` (else it is a typo)."""
    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, name) or {}:
            if not any(_pattern_matches(key, p) for p in paths):
                raise TargetError(
                    f"{config.method}: {name} key {excerpt(key, 80)} matches none of the {len(paths)} targeted "
                    f"modules (closest: {closest(key, paths)}); a pattern applies to targeted modules only"
                )


def base_entry(entry: dict[str, Any], base_shape: list[int], conv1d: bool | None) -> dict[str, Any]:
    """Linear or Conv1D as `al.load` decides it, by the module, whatever the file's `fan_in_fan_out`
    (PEFT resets the flag alike): the weight's layout if not square, else `conv1d`, else the guess."""
    if entry["type"] not in ("Linear", "Conv1D") or len(base_shape) != 2:
        return entry
    n_out, n_in = entry["shape"] if entry["type"] == "Linear" else entry["shape"][::-1]
    linear, conv, base = [n_out, n_in], [n_in, n_out], list(base_shape)
    if base not in (linear, conv):
        return entry
    kind = "Linear" if base == linear else "Conv1D"
    if base == linear == conv:
        kind = entry["type"] if conv1d is None else ("Conv1D" if conv1d else "Linear")
    return {"type": kind, "shape": linear if kind == "Linear" else conv}


def fingerprint_modules(
    data: dict[str, Any], tensors: dict[str, Tensor], where: str
) -> dict[str, dict[str, Any]]:
    """Linear (Conv1D with `fan_in_fan_out`), ConvNd or Embedding, with shapes read off the factors."""
    if data.get("target_parameters"):
        raise AdapterFileError(
            f"{where} is a PEFT target_parameters (expert weights) LoRA, whose layout needs the model: "
            "al.load it into the model and al.save it, then use that directory"
        )
    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.endswith(".base_layer.weight"):
            raise AdapterFileError(
                f"{where}: tensor {key!r} is a base weight PEFT saved beside an embedding LoRA "
                "(save_embedding_layers); only al.load, with the model, checks it: al.load it and al.save it"
            )
        found = _PEFT_KEY.fullmatch(key)
        if found is None:
            raise AdapterFileError(
                f"{where}: tensor {key!r} is not a LoRA tensor ('base_model.model.<module>.lora_A.weight' / "
                "lora_B, lora_embedding_A / _B, lora_magnitude_vector); adapterlab rebuilds only those"
            )
        factors.setdefault(found["path"], {})[found["key"].removesuffix(".weight")] = t
    fan_in_fan_out = bool(data.get("fan_in_fan_out"))
    modules = {}
    for path, ab in factors.items():
        if {"lora_A", "lora_B"} <= set(ab):
            a, b = ab["lora_A"].shape, ab["lora_B"].shape
        elif {"lora_embedding_A", "lora_embedding_B"} <= set(ab):
            a, b = ab["lora_embedding_A"].shape, ab["lora_embedding_B"].shape
            if len(a) != 2 or len(b) != 2:
                raise AdapterFileError(
                    f"{where}: module {path!r} has embedding factors that are not matrices"
                )
            modules[path] = {"type": "Embedding", "shape": [a[1], b[0]]}
            continue
        else:
            raise AdapterFileError(
                f"{where}: module {path!r} has {sorted(ab)} but not both factors of one layout"
            )
        if len(a) == 2:
            kind = "Conv1D" if fan_in_fan_out else "Linear"
            modules[path] = {"type": kind, "shape": [a[1], b[0]] if fan_in_fan_out else [b[0], a[1]]}
        else:
            modules[path] = {"type": f"Conv{len(a) - 2}d", "shape": [b[0], a[1], *a[2:]]}
    return modules


def inferred_fields(
    tensors: dict[str, Tensor], alphas: dict[str, float], where: str
) -> dict[str, Any] | None:
    """LoraConfig fields for a diffusers file without lora_adapter_metadata, as diffusers infers
    them: r from the lora_B factors, α from the network alphas, else α = r (scale 1); modules whose
    rank or α differs from the most common one go into `rank_pattern` / `alpha_pattern` (exact
    paths). A DoRA magnitude is refused naming the module (without metadata its scale is unknown).
    None if no key is a LoRA factor."""
    ranks = {}
    for key, t in tensors.items():
        found = _PEFT_KEY.fullmatch(key)
        if found is None:
            continue
        if found["key"] == "lora_magnitude_vector":
            raise AdapterFileError(
                f"{where}: {excerpt(key, 100)} is a DoRA magnitude in a file without lora_adapter_metadata; "
                "save it with its LoraConfig (use_dora=True) to load it"
            )
        if found["key"] in ("lora_B.weight", "lora_embedding_B") and t.dim() >= 2:
            ranks[found["path"]] = int(t.shape[1])
    if not ranks:
        return None
    stray = next((p for p in alphas if p not in ranks), None)
    if stray is not None:
        raise AdapterFileError(f"{where}: network alpha {stray + '.alpha'!r} belongs to no LoRA module")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    # without network alphas diffusers takes α = r per module (scale 1)
    per_alpha = {p: float(alphas.get(p, n if not alphas else -1.0)) for p, n in ranks.items()}
    missing = next((p for p, a in per_alpha.items() if a < 0), None)
    if missing is not None:
        raise AdapterFileError(
            f"{where}: module {missing!r} has no network alpha while others have one; add its "
            f"{missing + '.alpha'!r} tensor"
        )
    alpha = max(set(per_alpha.values()), key=list(per_alpha.values()).count)
    fields: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
    }
    rank_pattern = {re.escape(p): n for p, n in ranks.items() if n != r}
    alpha_pattern = {re.escape(p): a for p, a in per_alpha.items() if a != alpha}
    if rank_pattern:
        fields["rank_pattern"] = rank_pattern
    if alpha_pattern:
        fields["alpha_pattern"] = alpha_pattern
    return fields
