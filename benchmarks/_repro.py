"""What the reproduction scripts share: the provenance fields of their results, the spread of a
figure over seeds, and their command line (`--tiny`: a smoke run in seconds that writes nothing;
`--out`: where the results JSON goes)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def provenance(start: float) -> dict[str, Any]:
    """torch version, threads, wall and CPU seconds since `start` (the machine is shared: wall time
    overstates the cost)."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.time() - start,
        "cpu_seconds": time.process_time(),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max of one figure over the seeds."""
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def main(
    doc: str,
    name: str,
    run: Callable[[Any], dict[str, Any]],
    tiny: Any,
    full: Callable[[], Any],
    show: Callable[[dict[str, Any]], Any] = lambda result: result["summary"],
    tiny_help: str = "a smoke run in seconds; writes nothing",
) -> None:
    """Parse the command line, run `tiny` or `full()`, print `show(result)`, write the JSON."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    args = parser.parse_args()
    result = run(tiny if args.tiny else full())
    print(json.dumps(show(result), indent=1))
    if not args.tiny:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    print(f"total {result['seconds']:.0f} s")
