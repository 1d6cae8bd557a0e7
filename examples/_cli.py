"""The two helpers every example uses: run the `adapterlab` command, print the JSON result line.
(Light on purpose: it imports nothing heavy, so an example that needs no Trainer stays quick.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def adapterlab(*args: Any) -> str:
    """Run the `adapterlab` command installed beside this Python (echoed first); return its stdout.
    Exits with the command's stderr if it fails."""
    exe = Path(sys.executable).parent / "adapterlab"
    print("$ adapterlab " + " ".join(str(a) for a in args), flush=True)
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"adapterlab {args[0]} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    if done.stdout.strip():
        print(done.stdout.rstrip())
    return done.stdout


def report(result: dict[str, Any]) -> None:
    """Print `result` as one JSON line: the last line of every example's output."""
    print(json.dumps(result, sort_keys=True), flush=True)
