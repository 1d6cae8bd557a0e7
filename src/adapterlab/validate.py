"""`adapterlab validate`: an adapter checked against a base checkpoint from the checkpoint's
headers alone (format, fingerprint, modules, shapes, dtypes, fit, NaN/Inf). docs/cli.md#validate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import AdapterFileError, TargetError
from .files.adapter_dir import FORMAT_VERSION, AdapterFile
from .files.checkpoint_dir import Checkpoint, open_checkpoint
from .files.fingerprint import modules_sha256
from .files.safetensors import DTYPES, FLOAT_DTYPES
from .locate import fit_base, location_errors
from .sharing import tied_heads
from .skeleton import skeleton, zeros


@dataclass
class Check:
    """One validation check: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str


def validate(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike) -> list[Check]:
    """Check an adapter against a base checkpoint without loading the base's tensors: format
    version, fingerprint integrity, module mapping and weight shapes (from the base's safetensors
    headers), dtypes, that the tensors fit their modules, and that none holds NaN/Inf."""
    try:
        adapter = AdapterFile.open(adapter_dir)
    except AdapterFileError as e:
        return [Check("format", False, str(e))]
    metadata = adapter.metadata
    checks = [
        Check(
            "format",
            True,
            f"format version {metadata['format_version']} (this adapterlab reads up to "
            f"{FORMAT_VERSION}), method {adapter.method}, "
            f"written by {metadata['library_version']}",
        )
    ]
    if adapter.config.side_network:
        return checks + [
            Check(
                "deltas",
                False,
                f"a {adapter.method.upper()} side network has no weight deltas to check against a base",
            )
        ]
    base = open_checkpoint(base_dir)
    checks.append(_integrity_check(adapter))
    found = fit_base(adapter, base)
    problems = location_errors(adapter, base, found)
    located = (
        not found.missing
        and not found.ambiguous
        and not found.converted
        and not tied_heads(adapter.modules, base.root)
    )
    checks.append(
        Check(
            "modules",
            located,
            f"all {len(adapter.modules)} modules found in the checkpoint"
            if located
            else "; ".join(problems[:3]),
        )
    )
    shapes_ok = located and not problems
    checks.append(
        Check(
            "shapes",
            shapes_ok,
            "every weight shape matches"
            if shapes_ok
            else ("; ".join(problems[:3]) if located else "not checked: modules are missing"),
        )
    )
    checks.append(_dtype_check(adapter, base, found.keys))
    checks.append(
        _fit_check(adapter, base, found.keys)
        if shapes_ok
        else Check("tensors", False, "not checked: the shapes do not match")
    )
    checks.append(_finite_check(adapter))
    return checks


def _integrity_check(adapter: AdapterFile) -> Check:
    """The stored fingerprint hash against the modules it lists."""
    stored = adapter.metadata["fingerprint"].get("sha256")
    if stored is None:
        return Check("fingerprint", True, "none stored (PEFT-written); shapes inferred from lora_A/lora_B")
    digest = modules_sha256(adapter.modules)
    return Check(
        "fingerprint",
        digest == stored,
        f"sha256 {stored[:16]}… matches its {len(adapter.modules)} modules"
        if digest == stored
        else f"stored sha256 {stored[:16]}… but the modules hash to {digest[:16]}…",
    )


def _dtype_check(adapter: AdapterFile, base: Checkpoint, keys: dict[str, str]) -> Check:
    base_dtypes = sorted({base.tensors[k].dtype for k in keys.values()})
    bad_base = [k for k in keys.values() if base.tensors[k].dtype not in FLOAT_DTYPES]
    adapter_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values()})
    floats = [t for t in adapter.tensors.values() if t.is_floating_point()]
    ok = not bad_base and bool(floats)
    detail = f"base {', '.join(base_dtypes) or '-'}; adapter {', '.join(adapter_dtypes)}"
    if bad_base:
        detail += (
            f"; {bad_base[0]!r} is not floating point, adapters merge into F16/BF16/F32/F64 weights only"
        )
    elif not floats:
        detail += "; the adapter has no floating-point tensors"
    return Check("dtypes", ok, detail)


def _fit_check(adapter: AdapterFile, base: Checkpoint, keys: dict[str, str]) -> Check:
    """Build every delta on a zero skeleton of the base's dtype, as a load would."""
    for path, key in keys.items():
        info = base.tensors[key]
        try:
            delta = adapter.delta(
                path, skeleton(adapter.modules[path], zeros(info.shape, DTYPES[info.dtype]))
            )
        except (AdapterFileError, TargetError) as e:
            return Check("tensors", False, str(e))
        own = [t for t in delta.state_dict().values() if t.is_floating_point()]
        finite = all(bool(torch.isfinite(t).all()) for t in own)  # NaN in a tensor: the finite check's
        if finite and delta.mergeable and not bool(torch.isfinite(delta.delta_weight()).all()):
            return Check("tensors", False, f"the ΔW of {path!r} overflows to Inf (a huge alpha or factors)")
    return Check("tensors", True, f"{len(adapter.tensors)} tensors fit their {len(keys)} modules")


def _finite_check(adapter: AdapterFile) -> Check:
    bad = [
        k for k, t in adapter.tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    return Check(
        "finite",
        not bad,
        "no NaN/Inf" if not bad else f"NaN/Inf in {len(bad)} tensor(s): {', '.join(bad[:3])}",
    )
