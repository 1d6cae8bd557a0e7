"""The `adapterlab` command: a thin click layer over demo, checkpoint, export, validate and combine_file.

Exit codes: 0 ok; 1 an `AdapterlabError`, printed as one line `adapterlab: error: ...` on stderr
(the traceback too with `--debug`); 2 a usage error (bad or missing options).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import AdapterFileError, AdapterlabError, ConfigError
from .text import excerpt, printable
from .version import VERSION

# The commands import what they run when they run: `adapterlab --help` starts without torch.
# arithmetic.TENSOR_HOWS, written out for the same reason (tests/test_cli.py checks they agree).
MERGE_HOWS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")

__all__ = ["cli", "inspect_adapter", "main", "parse_size"]


def inspect_adapter(directory: str | os.PathLike) -> dict[str, Any]:
    """What `adapterlab inspect` reports: method, config and its settings (rank, density, …),
    targets (count and module types), parameter counts, size on disk, fingerprint."""
    from .files.adapter_dir import AdapterFile

    adapter = AdapterFile.open(directory)
    metadata, tensors = adapter.metadata, adapter.tensors
    fingerprint = metadata["fingerprint"]
    types: dict[str, int] = {}
    for entry in adapter.modules.values():
        types[entry["type"]] = types.get(entry["type"], 0) + 1
    files = [p for p in Path(directory).iterdir() if p.is_file()]
    return {
        "directory": str(directory),
        "method": metadata["method"],
        "format_version": metadata["format_version"],
        "library_version": metadata.get("library_version"),
        "config": metadata["config"],
        "settings": adapter.config.settings(),
        "targets": len(adapter.modules) or len(fingerprint.get("layers", {})),
        "target_types": dict(sorted(types.items())),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "fingerprint": fingerprint.get("sha256"),
    }


def parse_size(text: str) -> int:
    """Bytes from "2GB", "500MB", "1.5GiB" or "123456" (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
        "": 1,
    }
    clean = str(text).strip().upper().replace(" ", "")
    number = clean.rstrip("KMGTIB")
    unit = clean[len(number) :]
    try:
        value = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ConfigError(f"size {text!r} is not a size; write e.g. 2GB, 500MB or 1GiB") from None
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"size {text!r} must be at least 1 byte")
    return int(value)


class _Group(click.Group):
    """Turns an `AdapterlabError` into one stderr line and exit code 1 (unless --debug); so too any
    other OSError (the storage layer wraps its own as `StorageError`; this is the net under it)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (AdapterlabError, OSError) as e:
            if ctx.params.get("debug"):
                raise
            say(f"adapterlab: error: {' '.join(str(e).split())}", err=True)
            ctx.exit(1)
        except MemoryError:
            if ctx.params.get("debug"):
                raise
            say("adapterlab: error: out of memory; the input asks for more than this machine has", err=True)
            ctx.exit(1)
        except Exception as e:  # the last resort: a bad file must never show a traceback
            if ctx.params.get("debug"):
                raise
            say(
                f"adapterlab: error: unexpected {type(e).__name__}: {printable(' '.join(str(e).split())[:200])}. This is a bug "
                "in adapterlab; rerun with --debug for the traceback and report it",
                err=True,
            )
            ctx.exit(1)


def say(text: Any, err: bool = False) -> None:
    """Print `text` line by line, every line escaped (`text.printable`): file-controlled strings
    never reach the terminal raw."""
    for line in str(text).split("\n"):
        click.echo(printable(line), err=err)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="On an error, show the full traceback.")
@click.version_option(VERSION, prog_name="adapterlab")
def cli(debug: bool) -> None:
    """Parameter-efficient fine-tuning adapters: inspect, merge, export, combine, validate.

    \b
    Example:
      adapterlab inspect runs/lora
      adapterlab --debug merge --base models/llama --adapter runs/lora --out models/llama-merged
    """


@cli.command()
@click.option("--out", default="adapterlab-demo", show_default=True, help="Where the adapter is saved.")
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out: str, steps: int, seed: int) -> None:
    """Train, save, reload and merge a LoRA on a tiny Llama (no download).

    \b
    Example:
      adapterlab demo --out /tmp/demo --steps 100
    """
    from .demo import run

    run(out, steps=steps, seed=seed)


@cli.command()
@click.argument("directory", metavar="DIR")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(directory: str, as_json: bool) -> None:
    """Describe a saved adapter (ours or peft's): method, rank/density, targets, parameters,
    size on disk, fingerprint.

    \b
    Example:
      adapterlab inspect runs/lora
      adapterlab inspect runs/lora --json
    """
    info = inspect_adapter(directory)
    if as_json:
        say(json.dumps(info, sort_keys=True))
        return
    for key, value in info.items():
        say(f"{key:>16}: {printable(value)}")


def _weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 1,0.5") from None


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except AdapterlabError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@click.option(
    "--base", required=True, metavar="MODEL_DIR", help="Hugging Face model directory (safetensors)."
)
@click.option(
    "--adapter",
    "adapters",
    required=True,
    multiple=True,
    metavar="DIR",
    help="Adapter directory; repeat to merge several.",
)
@click.option(
    "--weights", callback=_weights, metavar="W1,W2,...", help="One weight per adapter (default: 1 each)."
)
@click.option(
    "--how",
    type=click.Choice(MERGE_HOWS),
    default="linear",
    show_default=True,
    help="How several adapters combine, per weight (al.combine's math).",
)
@click.option(
    "--density", type=float, default=0.2, show_default=True, help="ties / magnitude_prune: fraction kept."
)
@click.option("--p", "p", type=float, default=0.9, show_default=True, help="DARE drop probability.")
@click.option("--seed", type=int, default=0, show_default=True, help="DARE mask seed.")
@click.option("--out", required=True, metavar="OUT", help="New directory for the merged checkpoint.")
@click.option("--shard-size", default="2GB", show_default=True, callback=_size, help="Largest output shard.")
@click.option("--dry-run", is_flag=True, help="Print what would be merged; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (swapped in at the end).")
def merge(
    base: str,
    adapters: tuple[str, ...],
    weights: list[float] | None,
    how: str,
    density: float,
    p: float,
    seed: int,
    out: str,
    shard_size: int,
    dry_run: bool,
    overwrite: bool,
) -> None:
    """Merge adapters into a checkpoint, streaming shard by shard, into a new HF model directory.

    Memory stays about one weight matrix: only targeted weights are read into memory, one at a
    time; all other tensors are copied byte for byte. The output appears at OUT only when complete.

    \b
    Example:
      adapterlab merge --base models/llama --adapter runs/lora --out models/llama-lora
      adapterlab merge --base models/llama --adapter runs/a --adapter runs/b \\
          --weights 1,0.5 --how ties --density 0.3 --out models/llama-ab --shard-size 1GB
    """
    from .checkpoint import plan_merge, run_merge

    if weights is not None and len(weights) != len(adapters):
        raise click.BadParameter(
            f"{len(weights)} weights for {len(adapters)} adapters", param_hint="--weights"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_merge(base, list(adapters), weights, how, shard_size, density=density, p=p, seed=seed)
    for warning in caught:
        click.echo(f"adapterlab: warning: {' '.join(str(warning.message).split())}", err=True)
    if dry_run:
        say("\n".join(plan.describe()))
        say(f"dry run: nothing written (would write {out})")
        return
    target = run_merge(plan, out, overwrite=overwrite)
    say(
        f"merged {len(plan.targets)} weights from {len(adapters)} adapter(s) into {target} "
        f"({len(plan.outputs)} shard(s))"
    )


@cli.command()
@click.argument("directory", metavar="DIR")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "diffusers", "dense"]),
    required=True,
    help="peft: PEFT's LoRA directory; diffusers: diffusers' LoRA file; dense: one safetensors file of ΔW per module.",
)
@click.option(
    "--out", required=True, metavar="OUT", help="Directory (peft, diffusers) or .safetensors file (dense)."
)
@click.option(
    "--prefix",
    metavar="COMPONENT",
    default=None,
    help="diffusers: keys under this pipeline component (unet, transformer), for pipe.load_lora_weights.",
)
@click.option(
    "--base",
    metavar="MODEL_DIR",
    type=click.Path(),
    help="dense: name each ΔW by the key of this checkpoint it adds to (as merge maps it).",
)
def export(directory: str, fmt: str, out: str, prefix: str | None, base: str | None) -> None:
    """Export an adapter as a PEFT LoRA directory, a diffusers LoRA file or dense ΔW per module.

    peft loads with peft.PeftModel.from_pretrained, diffusers with unet.load_lora_adapter (or,
    with --prefix unet, pipe.load_lora_weights), both LoRA only. dense holds `<module>.weight` =
    the scaled ΔW in the base weight's layout, for every method but LEVI: merged W = W + ΔW.

    \b
    Example:
      adapterlab export runs/lora --format peft --out runs/lora-peft
      adapterlab export runs/unet-lora --format diffusers --prefix unet --out runs/unet-lora-diffusers
      adapterlab export runs/sft --format dense --out runs/sft-delta.safetensors
      adapterlab export runs/vit-lora --format dense --base models/vit --out runs/vit-delta.safetensors
    """
    from .export import export_dense, export_diffusers, export_peft

    if prefix is not None and fmt != "diffusers":
        raise click.BadParameter("--prefix is for --format diffusers", param_hint="--prefix")
    if base is not None and fmt != "dense":
        raise ConfigError(
            f"--base names the ΔW of --format dense; --format {fmt} keys modules by path: drop --base"
        )
    if fmt == "diffusers":
        written = export_diffusers(directory, out, prefix)
    else:
        written = export_peft(directory, out) if fmt == "peft" else export_dense(directory, out, base)
    say(f"wrote {written}")


@cli.command()
@click.argument("config", metavar="CONFIG.yaml")
def combine(config: str) -> None:
    """Combine adapters as a YAML file says (al.combine's options); no base model needed.

    Keys: adapters {name: dir}, weights, how, kind, density, p, seed, rank, trim_scope, out,
    base (optional). Relative paths are relative to the YAML file. The resolved options are
    written beside the adapter as OUT/combine.yaml.

    \b
    Example config (adapterlab combine ab.yaml):
      adapters: {a: runs/a, b: runs/b}
      weights: {a: 1.0, b: 0.5}
      how: ties
      kind: lora
      rank: 16
      out: runs/ab
    """
    from .combine_file import run_combine

    resolved, report = run_combine(config)
    extra = f", rank {report.rank}" if report.rank else ""
    lost = f"; discarded {100 * report.discarded_fraction:.2f}% of the energy" if report.discarded else ""
    say(
        f"combined {len(resolved['adapters'])} adapters ({report.how}, kind {report.kind}{extra}) "
        f"into {resolved['out']}{lost}"
    )


@cli.command(name="validate")
@click.argument("directory", metavar="DIR")
@click.option(
    "--base", required=True, metavar="MODEL_DIR", help="Hugging Face model directory (safetensors)."
)
def validate_command(directory: str, base: str) -> None:
    """Check an adapter against a base checkpoint (reads the base's headers only).

    Checks: format version, fingerprint, modules found, weight shapes, dtypes, that the tensors fit
    their modules, NaN/Inf. Exit code 1 if any check fails.

    \b
    Example:
      adapterlab validate runs/lora --base models/llama
    """
    from .validate import validate

    checks = validate(directory, base)
    for check in checks:
        say(f"{'ok' if check.ok else 'FAIL':>4}  {check.name:<11} {' '.join(check.detail.split())}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise AdapterFileError(
            f"{excerpt(directory)} failed {len(failed)} of {len(checks)} checks against {base!r}: "
            f"{', '.join(failed)}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 or 1). Usage errors exit with code 2 (SystemExit)."""
    try:
        code = cli.main(args=argv, prog_name="adapterlab", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except click.Abort:
        click.echo("Aborted!", err=True)
        raise SystemExit(1) from None
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
