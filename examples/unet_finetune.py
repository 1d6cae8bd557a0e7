"""LoRA and SaRA on a diffusion UNet, end to end, with diffusers on both sides.

    python examples/unet_finetune.py            # minutes (961 s on the busy shared 2-core machine)
    python examples/unet_finetune.py --tiny     # seconds (CI)

1. A small `diffusers.UNet2DConditionModel` (random weights, no download) is pre-trained for a few
   steps to denoise horizontal stripes (DDPM's ε-prediction objective, `DDPMScheduler`), and saved
   as a diffusers pipeline directory (`model_index.json` + `unet/`).
2. Each method fine-tunes it to a new pattern (checkerboards, conditioned on a text-like
   embedding): LoRA (r = 4, α = 8: α ≠ r, so a lost scale would show) on the attention projections
   and the ResNet convolutions; SaRA (the smallest 5% of every targeted weight) with its
   nuclear-norm term (`al.before_step`). The held-out denoising loss is reported before and after.
3. Both are saved with `al.save` and merged into the pipeline's UNet with `adapterlab merge
   --base PIPELINE_DIR`; `UNet2DConditionModel.from_pretrained` loads the merged folder, whose
   outputs must equal the adapted model's.
4. LoRA is also saved in diffusers' format (`al.save(..., format="diffusers", prefix="unet")`) and
   loaded with diffusers' own `unet.load_lora_adapter`: outputs equal again (exact α/r).

The last line is the results as JSON. Needs `pip install diffusers peft` (the `diffusers` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _cli import report
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

import adapterlab as al
from adapterlab.cli import main as adapterlab_main

OUT = Path(tempfile.gettempdir()) / "adapterlab-examples" / "unet_finetune"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
SARA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]

diffusers_logging.set_verbosity_error()


def adapterlab(*args: object) -> None:
    """The `adapterlab` command, run in this process (a subprocess would import torch again)."""
    print("$ adapterlab " + " ".join(map(str, args)), flush=True)
    if adapterlab_main([str(a) for a in args]) != 0:
        sys.exit(f"adapterlab {args[0]} failed")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet, 8x8 latents, few steps (CI)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the base, adapters and merges go")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 200; --tiny 4)")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (LoRA), 1e-4 (SaRA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU is busy)")
    return parser.parse_args()


def build_unet(tiny: bool, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    width = 16 if tiny else 32
    return UNet2DConditionModel(
        sample_size=8 if tiny else 16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def patterns(kind: str, n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` latents of a pattern ("stripes" or "checkers") with random period, phase and channel
    weights, in [-1, 1]; and their conditioning (a 5-token embedding that encodes the period)."""
    period = torch.randint(2, 5, (n,), generator=gen)
    phase = torch.randint(0, 4, (n,), generator=gen)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    rows = ((ys[None] + phase[:, None, None]) // period[:, None, None]) % 2
    if kind == "checkers":
        rows = (rows + (xs[None] // period[:, None, None]) % 2) % 2
    channels = torch.rand(n, 4, 1, 1, generator=gen) * 2 - 1
    latents = (rows[:, None].float() * 2 - 1) * channels
    table = torch.randn(5, 5, 32, generator=torch.Generator().manual_seed(1234))  # period -> tokens
    return latents, table[period]


def denoising_loss(unet, scheduler, batch, gen: torch.Generator) -> torch.Tensor:
    """DDPM's ε-prediction loss on `batch` (latents, conditioning) with noise and steps from `gen`."""
    latents, cond = batch
    noise = torch.randn(latents.shape, generator=gen)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noisy = scheduler.add_noise(latents, noise, steps)
    return F.mse_loss(unet(noisy, steps, encoder_hidden_states=cond).sample, noise)


def evaluate(unet, scheduler, batch) -> float:
    with torch.no_grad():
        return denoising_loss(unet, scheduler, batch, torch.Generator().manual_seed(99)).item()


def train(unet, scheduler, kind: str, steps: int, lr: float, size: int, seed: int, adapter: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    unet.train()
    for step in range(steps):
        loss = denoising_loss(unet, scheduler, patterns(kind, 8, size, gen), gen)
        loss.backward()
        if adapter:
            al.before_step(unet, step)  # SaRA's nuclear-norm term (LoRA: nothing)
        optimizer.step()
        if adapter:
            al.after_step(unet, step, optimizer)
        optimizer.zero_grad(set_to_none=True)
    unet.eval()


def probe(unet, size: int) -> torch.Tensor:
    """The UNet's output on fixed inputs, to compare the ways of applying an adapter."""
    latents, cond = patterns("checkers", 4, size, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 200, 500, 900]), encoder_hidden_states=cond).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def fine_tune(method: str, args: argparse.Namespace, pipeline: Path, scheduler, size: int) -> dict:
    """Train one adapter on the saved base, save it, merge it with the CLI, check every copy."""
    base = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    held_out = patterns("checkers", 16, size, torch.Generator().manual_seed(5))
    before = evaluate(base, scheduler, held_out)
    if method == "lora":
        al.inject(base, "lora", r=4, alpha=8, targets=LORA_TARGETS)
    else:
        al.inject(base, "sara", density=0.05, targets=SARA_TARGETS)
    steps = args.steps if args.steps is not None else (4 if args.tiny else 200)
    lr = args.lr if args.lr is not None else (1e-3 if method == "lora" else 1e-4)
    train(base, scheduler, "checkers", steps, lr, size, args.seed + 1, adapter=True)
    want = probe(base, size)
    result = {
        "loss_before": before,
        "loss_after": evaluate(base, scheduler, held_out),
        "trainable": al.trainable_summary(base).trainable,
        "steps": steps,
    }
    with al.disabled(base):
        result["adapter_max_change"] = max_diff(want, probe(base, size))
    adapter_dir = args.out / method
    al.save(base, adapter_dir)
    merged_dir = args.out / f"{method}-merged-unet"
    adapterlab("merge", "--base", pipeline, "--adapter", adapter_dir, "--out", merged_dir, "--overwrite")
    merged = UNet2DConditionModel.from_pretrained(merged_dir).eval()
    result["merged_max_abs_diff"] = max_diff(probe(merged, size), want)
    result["merged_dir"] = str(merged_dir)
    if method == "lora":
        lora_dir = args.out / "lora-diffusers"
        al.save(base, lora_dir, format="diffusers", prefix="unet")  # pipe.load_lora_weights's layout
        theirs = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
        theirs.load_lora_adapter(str(lora_dir), prefix="unet", use_safetensors=True)
        result["diffusers_max_abs_diff"] = max_diff(probe(theirs, size), want)
        result["diffusers_dir"] = str(lora_dir)
    return result


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    size = 8 if args.tiny else 16
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = build_unet(args.tiny, args.seed)
    train(unet, scheduler, "stripes", 2 if args.tiny else 300, 1e-3, size, args.seed, adapter=False)
    pipeline = args.out / "pipeline"
    unet.save_pretrained(pipeline / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (pipeline / "model_index.json").write_text(json.dumps(index))
    results = {method: fine_tune(method, args, pipeline, scheduler, size) for method in ("lora", "sara")}
    for method, r in results.items():
        print(
            f"{method}: held-out loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}, "
            f"{r['trainable']} trainable, merged Δ {r['merged_max_abs_diff']:.2e}"
        )
    report({**results, "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
