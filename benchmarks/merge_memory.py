"""Memory `al.merge` keeps on a bf16 model until unmerge, vs peft's `merge_adapter`, each variant in
its own process (so one's allocations cannot hide in the other's heap).

Model: a bf16 Llama (hidden 1024, intermediate 2816, 4 layers, vocab 1024), LoRA r=16 / alpha=32 on
every linear layer of the decoder, factors ~ N(0, std²) (`--std`, default 0.02: |ΔW| ≈ 16% of |W|;
0.005: ≈ 1%), B non-zero. The child builds the model, injects (ours) or wraps it (peft) with the same
factors, runs gc, reads its RSS, merges, runs gc and `malloc_trim`, reads its RSS again.

- retained: RSS after merge − RSS before, as a fraction of the merged weights' bytes (the issue's
  measure; target ≤ 0.10× by default). peft keeps nothing (its unmerge subtracts again and is not
  bit-exact in bf16); ours keeps what makes unmerge bit-exact.
- file: the part of retained that is file-backed (torch library code paged in by kernels that
  first run during the merge; shared and reclaimable, and gone from the count once warm).
- second merge: retained by merging again after unmerge, in the same process.
- record: for ours, the exact bytes of what the merged layers keep (rounding records, rounding.py).
- exact: after unmerge, is every base weight bit-identical to before the merge?

    python benchmarks/merge_memory.py               # 3 runs per variant; PASS/FAIL; results JSON
    python benchmarks/merge_memory.py --std 0.005   # a smaller update
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/merge_memory_std{std}.json"
TARGET = 0.10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(variant: str, std: float) -> dict:
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    if variant == "ours":
        import adapterlab as al
        from adapterlab.layer import AdapterLayer

        al.inject(model, "lora", r=16, alpha=32, targets=TARGETS)
        factors = [p for n, p in model.named_parameters() if "lora_" in n]
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        factors = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in factors:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    bases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    merged_bytes = sum(w.numel() * w.element_size() for w in bases.values())
    libc = ctypes.CDLL("libc.so.6")
    process = psutil.Process()

    def rss() -> tuple[int, int]:
        """(RSS, its file-backed part: library code paged in by kernels run for the first time)."""
        gc.collect()
        libc.malloc_trim(0)
        lines = Path("/proc/self/status").read_text().splitlines()
        status = dict(line.split(":") for line in lines if line.startswith("Rss"))
        return process.memory_info().rss, int(status["RssFile"].split()[0]) * 1024

    before = rss()
    if variant == "ours":
        al.merge(model)
        record = sum(
            layer.merge_record_bytes() for layer in model.modules() if isinstance(layer, AdapterLayer)
        )
    else:
        model.merge_adapter()
        record = 0
    after = rss()
    if variant == "ours":
        al.unmerge(model)
    else:
        model.unmerge_adapter()
    params = dict(model.named_parameters())
    exact = all(torch.equal(params[n].view(torch.int16), w.view(torch.int16)) for n, w in bases.items())
    again = rss()  # a second merge in the same process: its kernels' code is paged in already
    if variant == "ours":
        al.merge(model)
    else:
        model.merge_adapter()
    second = rss()[0] - again[0]
    return {
        "retained_second_merge_ratio": second / merged_bytes,
        "retained_ratio": (after[0] - before[0]) / merged_bytes,
        "retained_file_ratio": (after[1] - before[1]) / merged_bytes,
        "record_ratio": record / merged_bytes,
        "merged_MB": merged_bytes / 2**20,
        "exact_unmerge": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--std", type=float, default=0.02, help="std of the LoRA factors (ΔW's scale)")
    parser.add_argument("--child", choices=["ours", "peft"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.std)))
        return
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for _ in range(args.runs):  # interleaved, each in a fresh process
        for variant in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--std", str(args.std)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {
        v: {
            "retained_ratio_median": statistics.median(r["retained_ratio"] for r in rs),
            "retained_file_ratio_median": statistics.median(r["retained_file_ratio"] for r in rs),
            "retained_second_merge_ratio_median": statistics.median(
                r["retained_second_merge_ratio"] for r in rs
            ),
            "record_ratio": rs[0]["record_ratio"],
            "merged_MB": rs[0]["merged_MB"],
            "exact_unmerge": all(r["exact_unmerge"] for r in rs),
        }
        for v, rs in runs.items()
    }
    ours = summary["ours"]["retained_ratio_median"]
    verdict = "PASS" if ours <= TARGET else "FAIL"
    for v, s in summary.items():
        print(
            f"{v:5} retained {s['retained_ratio_median']:.3f}x of {s['merged_MB']:.0f} MB merged "
            f"(file-backed code {s['retained_file_ratio_median']:.3f}x; a second merge "
            f"{s['retained_second_merge_ratio_median']:.3f}x) "
            f"(record {s['record_ratio']:.3f}x), bit-exact unmerge: {s['exact_unmerge']}"
        )
    print(f"{verdict}: al.merge retained {ours:.3f}x (target <= {TARGET}x)")
    results = Path(str(RESULTS).format(std=args.std))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/merge_memory.py --runs {args.runs} --std {args.std}",
                "runs": runs,
                **summary,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
