"""The `adapterlab` command."""
from __future__ import annotations

import argparse
import sys

from .errors import AdapterlabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterlab", description="Parameter-efficient fine-tuning adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, save, reload and merge a LoRA on a tiny Llama (no download)",
                          epilog="example: adapterlab demo --out /tmp/demo --steps 100")
    demo.add_argument("--out", default="adapterlab-demo", help="where the adapter is saved (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run

            run(args.out, steps=args.steps, seed=args.seed)
        return 0
    except AdapterlabError as e:
        if args.debug:
            raise
        print(f"adapterlab: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
