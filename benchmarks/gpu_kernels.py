"""Triton kernels vs torch and peft on a CUDA GPU: LoRA forward / forward+backward, multi-adapter
routing, and the sparse sampled gradient. Writes JSON + a markdown table.

    python benchmarks/gpu_kernels.py                 # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --dry-run   # CPU, CI-size shapes

Shapes (full run): M ∈ {16, 512, 8192} tokens, K = N = 4096, r ∈ {16, 64}, bf16. Routing: 8
adapters r=16, samples of 512 tokens spread over them. Sparse: density 1% of a 4096×4096 weight.
Timings: triton.testing.do_bench (median), every variant of a row measured back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def bench(fn, grads=(), dry=False) -> float:
    """Median milliseconds of fn()."""
    if dry:
        fn()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")


def peft_lora_layer(weight, r, alpha):
    import peft

    base = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    base[0].weight.data = weight.clone()
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]))
    model.to(weight.device, weight.dtype)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    return model


def lora_rows(shapes, ranks, n, dtype, device, dry):
    from adapterlab.kernels import lora as triton_lora
    from adapterlab.kernels import reference

    rows = []
    for m in shapes:
        for r in ranks:
            gen = torch.Generator(device=device).manual_seed(0)
            w = torch.randn(n, n, device=device, dtype=dtype, generator=gen) / n**0.5
            x = torch.randn(m, n, device=device, dtype=dtype, generator=gen, requires_grad=True)
            a = (torch.randn(r, n, device=device, dtype=dtype, generator=gen) / n**0.5).requires_grad_()
            b = (torch.randn(n, r, device=device, dtype=dtype, generator=gen) * 0.01).requires_grad_()
            g = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
            theirs = peft_lora_layer(w, r, 2 * r)
            variants = {
                "base": lambda: F.linear(x, w),
                "peft": lambda: theirs(x),
                "ours_torch": lambda: reference.lora_add(F.linear(x, w), x, a, b, 2.0),
                "ours_triton": lambda: triton_lora.lora_add(F.linear(x, w), x, a, b, 2.0),
            }
            row = {"M": m, "K=N": n, "r": r}
            with torch.no_grad():  # the Triton result must match the torch path before it is timed
                want = variants["ours_torch"]().float()
                row["triton_max_err"] = (variants["ours_triton"]().float() - want).abs().max().item()
                assert row["triton_max_err"] <= 2e-2 * want.abs().max().item(), row
            for name, fn in variants.items():
                with torch.no_grad():
                    row[f"{name}_fwd_ms"] = bench(fn, dry=dry)
                row[f"{name}_fwdbwd_ms"] = bench(lambda fn=fn: fn().backward(g), grads=[x, a, b], dry=dry)
            for name in ("peft", "ours_torch", "ours_triton"):
                for kind in ("fwd", "fwdbwd"):
                    row[f"{name}_{kind}_x_base"] = row[f"{name}_{kind}_ms"] / row[f"base_{kind}_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def routing_rows(tokens_list, seq, n, dtype, device, dry, adapters=8, r=16):
    import peft

    from adapterlab.kernels import lora as triton_lora

    rows = []
    for tokens in tokens_list:
        batch = max(1, tokens // seq)
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(n, n, device=device, dtype=dtype, generator=gen) / n**0.5
        x = torch.randn(batch, seq, n, device=device, dtype=dtype, generator=gen)
        As = [torch.randn(r, n, device=device, dtype=dtype, generator=gen) / n**0.5 for _ in range(adapters)]
        Bs = [torch.randn(n, r, device=device, dtype=dtype, generator=gen) * 0.01 for _ in range(adapters)]
        names = [f"a{i}" for i in range(adapters)]
        sample_ids = [i % adapters for i in range(batch)]
        token_ids = torch.tensor(sample_ids, device=device).repeat_interleave(seq)
        base = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False))
        base[0].weight.data = w.clone()
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
        theirs = peft.get_peft_model(base, cfg, adapter_name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, cfg)
        theirs.to(device, dtype).eval()

        def ours():
            return triton_lora.grouped_lora_add(F.linear(x, w), x, token_ids, As, Bs, [2.0] * adapters)

        def ours_loop():  # the torch path the layer takes without Triton: one gather/scatter per adapter
            out = F.linear(x, w)
            for g in range(adapters):
                rows_g = torch.tensor([i for i, s in enumerate(sample_ids) if s == g], device=device)
                if len(rows_g):
                    xs = x.index_select(0, rows_g)
                    out.index_copy_(
                        0, rows_g, out.index_select(0, rows_g) + 2.0 * (xs @ As[g].t()) @ Bs[g].t()
                    )
            return out

        with torch.no_grad():
            want = ours_loop().float()
            err = (ours().float() - want).abs().max().item()
            assert err <= 2e-2 * want.abs().max().item(), err
            row = {
                "tokens": batch * seq,
                "adapters": adapters,
                "r": r,
                "grouped_max_err": err,
                "base_ms": bench(lambda: F.linear(x, w), dry=dry),
                "peft_adapter_names_ms": bench(
                    lambda: theirs(x, adapter_names=[names[s] for s in sample_ids]), dry=dry
                ),
                "ours_torch_loop_ms": bench(ours_loop, dry=dry),
                "ours_triton_grouped_ms": bench(ours, dry=dry),
            }
        row["speedup_vs_peft"] = row["peft_adapter_names_ms"] / row["ours_triton_grouped_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sparse_rows(tokens_list, n, density, dtype, device, dry):
    from adapterlab.kernels import sparse as triton_sparse

    rows = []
    for tokens in tokens_list:
        gen = torch.Generator(device=device).manual_seed(0)
        dy = torch.randn(tokens, n, device=device, dtype=dtype, generator=gen)
        x = torch.randn(tokens, n, device=device, dtype=dtype, generator=gen)
        k = int(density * n * n)
        flat = torch.randperm(n * n, device=device, generator=gen)[:k].sort().values
        r_idx, c_idx = flat // n, flat % n
        want = (dy.float().t() @ x.float()).view(-1)[flat]
        err = (
            (triton_sparse.sampled_grad(dy, x, r_idx, c_idx, out_dtype=torch.float32) - want)
            .abs()
            .max()
            .item()
        )
        assert err <= 1e-2 * want.abs().max().item(), err
        row = {
            "tokens": tokens,
            "K=N": n,
            "density": density,
            "k": k,
            "sampled_max_err": err,
            "dense_dW_gather_ms": bench(lambda: (dy.t() @ x).view(-1)[flat], dry=dry),
            "ours_sampled_ms": bench(lambda: triton_sparse.sampled_grad(dy, x, r_idx, c_idx), dry=dry),
            "ours_sampled_pretransposed_ms": None,
        }
        dyt, xt = dy.t().contiguous(), x.t().contiguous()  # token dim contiguous per entry's row/col
        row["ours_sampled_pretransposed_ms"] = bench(
            lambda: triton_sparse.sampled_grad(dyt.t(), xt.t(), r_idx, c_idx), dry=dry
        )
        row["speedup_vs_dense"] = row["dense_dW_gather_ms"] / row["ours_sampled_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(
        ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, needs TRITON_INTERPRET=1")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run (with TRITON_INTERPRET=1) to check the script on CPU")
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--dry-run runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    n = 32 if dry else 4096
    results = {
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "lora": lora_rows(
            [16, 48] if dry else [16, 512, 8192], [4] if dry else [16, 64], n, dtype, device, dry
        ),
        "routing": routing_rows([64] if dry else [512, 8192], 8 if dry else 512, n, dtype, device, dry),
        "sparse": sparse_rows([16] if dry else [512, 8192], n, 0.01 if not dry else 0.1, dtype, device, dry),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_kernels_dry" if dry else "gpu_kernels"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"device: {results['device']}, torch {results['torch']}, dtype {dtype}"]
    for section in ("lora", "routing", "sparse"):
        md += ["", f"### {section}", "", table(results[section])]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
