"""`adapterlab combine CONFIG.yaml`: al.combine's options read from a YAML file (checked field by
field; paths relative to the file), run on a skeleton built from the adapters' fingerprints, and
saved with the resolved options as `out/combine.yaml`. docs/cli.md#combine.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from . import yaml_file
from .compose import HOWS, KINDS, CombineReport, check_options, combine
from .errors import ConfigError, FingerprintMismatchError, closest
from .files.adapter_dir import AdapterFile
from .files.atomic import write_dir_atomic
from .files.fs import check_output
from .io import adapter_files, load
from .skeleton import require_memory, skeleton_model
from .text import excerpt, printable

FIELDS = ("adapters", "weights", "how", "kind", "density", "p", "seed", "rank", "trim_scope", "out", "base")
DEFAULTS: dict[str, Any] = {
    "how": "linear",
    "kind": "lora",
    "density": 0.2,
    "p": 0.9,
    "seed": 0,
    "rank": None,
    "trim_scope": "tensor",
    "base": None,
}
RESOLVED_FILE = "combine.yaml"
_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def _number(value: Any) -> bool:
    """A finite int or float (an int too large for a float is not: it would overflow later)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return abs(value) < 2**1023 if isinstance(value, int) else math.isfinite(value)


def _path(where: str, field: str, value: Any, root: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {field}={excerpt(value)} must be a path (a string)")
    try:
        return str((root / value).resolve())
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, names too long, symlink loops
        raise ConfigError(
            f"{where}: {field}={excerpt(value)} is not a usable path ({printable(e)})"
        ) from None


def _adapters(where: str, value: Any, root: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f"{where}: adapters={excerpt(value)} must be a mapping of names to adapter directories, "
            "e.g. {{math: runs/math, code: runs/code}}"
        )
    bad = [n for n in value if not (isinstance(n, str) and _NAME.fullmatch(n))]
    if bad:
        raise ConfigError(
            f"{where}: adapter name {excerpt(bad[0])} is invalid; use letters, digits, '_' or '-'"
        )
    return {name: _path(where, f"adapters.{name}", d, root) for name, d in value.items()}


def _weights(where: str, value: Any, names: list[str]) -> dict[str, float]:
    if value is None:
        return {n: 1.0 for n in names}
    if isinstance(value, list):
        if len(value) != len(names):
            raise ConfigError(f"{where}: weights has {len(value)} entries for {len(names)} adapters {names}")
        value = dict(zip(names, value, strict=True))
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: weights={excerpt(value)} must be a mapping {{name: weight}} or a list of numbers"
        )
    unknown = [n for n in value if n not in names]
    if unknown:
        raise ConfigError(f"{where}: weights names unknown adapter {excerpt(unknown[0])}; adapters: {names}")
    missing = [n for n in names if n not in value]
    if missing:
        raise ConfigError(
            f"{where}: weights has no entry for adapter {missing[0]!r}; give every adapter a weight"
        )
    bad = {n: w for n, w in value.items() if not _number(w)}
    if bad:
        raise ConfigError(f"{where}: weights {excerpt(bad)} must be finite numbers")
    return {n: float(value[n]) for n in names}


def _scalars(where: str, data: dict[str, Any]) -> dict[str, Any]:
    """how, kind, density, p, seed, rank, trim_scope: types here, ranges by al.combine's checks."""
    out = {k: data.get(k, DEFAULTS[k]) for k in ("how", "kind", "density", "p", "seed", "rank", "trim_scope")}
    for key, choices in (("how", HOWS), ("kind", KINDS), ("trim_scope", ("tensor", "global"))):
        if out[key] not in choices:
            raise ConfigError(f"{where}: {key}={excerpt(out[key])} is not one of {', '.join(choices)}")
    for key in ("density", "p"):
        if not _number(out[key]):
            raise ConfigError(f"{where}: {key}={excerpt(out[key])} must be a number")
    seed = out["seed"]
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ConfigError(f"{where}: seed={excerpt(seed)} must be an integer in [0, 2**63)")
    if out["rank"] is not None and not (isinstance(out["rank"], int) and not isinstance(out["rank"], bool)):
        raise ConfigError(f"{where}: rank={excerpt(out['rank'])} must be a positive integer or null")
    try:
        check_options(out["how"], out["kind"], out["density"], out["p"], out["trim_scope"], out["rank"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML file's options, checked field by field, with defaults filled in and paths made
    absolute (relative to the file). Unknown keys are errors."""
    file = Path(path)
    where = excerpt(str(file))
    data = yaml_file.load(file)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} must hold a YAML mapping of options ({', '.join(FIELDS)}), not a {type(data).__name__}"
        )
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {excerpt(unknown[0])} (did you mean "
            f"{closest(str(unknown[0])[:100], FIELDS)}?); valid keys: {', '.join(FIELDS)}"
        )
    for key in ("adapters", "out"):
        if key not in data:
            raise ConfigError(f"{where}: {key!r} is required")
    root = file.resolve().parent
    adapters = _adapters(where, data["adapters"], root)
    resolved = {
        "adapters": adapters,
        "weights": _weights(where, data.get("weights"), list(adapters)),
        **_scalars(where, data),
        "out": _path(where, "out", data["out"], root),
    }
    base = data.get("base")
    resolved["base"] = None if base is None else _path(where, "base", base, root)
    return {k: resolved[k] for k in FIELDS}


def _union(files: dict[str, AdapterFile]) -> dict[str, dict[str, Any]]:
    """Every targeted module of every adapter; adapters must agree on the modules they share."""
    modules: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    for name, adapter in files.items():
        for path, entry in adapter.modules.items():
            seen = modules.setdefault(path, entry)
            owner.setdefault(path, name)
            if seen["shape"] != entry["shape"] or seen["type"] != entry["type"]:
                raise FingerprintMismatchError(
                    f"adapters {owner[path]!r} and {name!r} were made for different models: {excerpt(path)} is a "
                    f"{excerpt(seen['type'])} {seen['shape']} in one and a {excerpt(entry['type'])} "
                    f"{entry['shape']} in the other"
                )
    return modules


def run_combine(path: str | os.PathLike) -> tuple[dict[str, Any], CombineReport]:
    """Combine the adapters the YAML file at `path` names; returns the resolved config and al.combine's report."""
    from .files.checkpoint_dir import open_checkpoint
    from .locate import locate_adapter

    config = read_config(path)
    # OUT may hold the YAML file itself: re-running OUT/combine.yaml rewrites it with the same options
    check_output(config["out"], [*config["adapters"].values(), *([config["base"]] if config["base"] else [])])
    files = {name: AdapterFile.open(d) for name, d in config["adapters"].items()}
    for adapter in files.values():
        adapter.require_deltas("combined")
    if config["base"] is not None:
        base = open_checkpoint(config["base"])
        for adapter in files.values():
            locate_adapter(adapter, base)
    dtype = torch.float64 if any(a.dtype == torch.float64 for a in files.values()) else torch.float32
    modules = _union(files)
    shapes = [m["shape"] for m in modules.values()]
    if (
        shapes and config["kind"] != "dense"
    ):  # a dense result holds every ΔW at once; the others one at a time
        shapes = [max(shapes, key=math.prod)]
    require_memory(shapes, dtype, f"combining {len(files)} adapters", copies=3)
    model = skeleton_model(modules, dtype)
    for name, d in config["adapters"].items():
        load(model, d, name=name)
    into = "combined"
    while into in files:
        into += "_"
    report = combine(
        model,
        config["weights"],
        how=config["how"],
        into=into,
        kind=config["kind"],
        density=config["density"],
        trim_scope=config["trim_scope"],
        p=config["p"],
        seed=config["seed"],
        rank=config["rank"],
    )
    config["rank"] = report.rank
    # the adapter and combine.yaml in one atomic directory write: both new, or neither
    contents = {**adapter_files(model, into), RESOLVED_FILE: _yaml(config).encode()}
    write_dir_atomic(Path(config["out"]), contents)
    return config, report


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    head = "# written by adapterlab combine: every option with its effective value\n"
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
