"""The `adapterlab` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import AdapterlabError


def inspect_adapter(directory: str) -> dict[str, Any]:
    """What `adapterlab inspect` reports: method, config, targets, parameter counts, size, fingerprint."""
    from .io import read_adapter

    block, tensors = read_adapter(directory)
    fingerprint = block.get("fingerprint") or {}
    files = [p for p in Path(directory).iterdir() if p.is_file()]
    return {
        "directory": str(directory),
        "method": block["method"],
        "format_version": block["format_version"],
        "library_version": block.get("library_version"),
        "config": block.get("config"),
        # peft-written directories carry no fingerprint: count the modules their LoRA keys name
        "targets": len(fingerprint.get("modules", {})) or len({k.rsplit(".", 2)[0] for k in tensors}),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "fingerprint": fingerprint.get("sha256"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterlab", description="Parameter-efficient fine-tuning adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, save, reload and merge a LoRA on a tiny Llama (no download)",
                          epilog="example: adapterlab demo --out /tmp/demo --steps 100")
    demo.add_argument("--out", default="adapterlab-demo", help="where the adapter is saved (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    inspect = sub.add_parser("inspect", help="describe a saved adapter directory (ours or peft's)",
                             epilog="examples: adapterlab inspect out/   |   adapterlab inspect out/ --json")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run

            run(args.out, steps=args.steps, seed=args.seed)
        elif args.command == "inspect":
            info = inspect_adapter(args.directory)
            if args.json:
                print(json.dumps(info, sort_keys=True))
            else:
                for key, value in info.items():
                    print(f"{key:>16}: {value}")
        return 0
    except AdapterlabError as e:
        if args.debug:
            raise
        print(f"adapterlab: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
