"""Two-process training of adapters, launched by tests/test_distributed.py (not a test module itself):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --standalone \
        tests/distributed_worker.py OUT SCRATCH [--callback] [--fsdp]

On CPU with the gloo backend, for a tiny Llama with adapters injected before wrapping:
- plain DDP with LoRA, an SFT sparse adapter on a fixed random support, and SaRA with its
  nuclear-norm term (runs `ddp-lora`, `ddp-sft`, `ddp-sara`);
- `transformers.Trainer`, DDP set up by accelerate from the torchrun environment, with LoRA
  (`trainer-lora`); with `--callback`, with `adapterlab.integrations.AdapterCallback`: LoRA, SaRA
  (re-selection after step 1) and LT-SFT by schedule (phase switch after step 0)
  (`trainer-callback-METHOD`), each saving a checkpoint under SCRATCH/RUN/ at the last step;
- with `--fsdp`, FSDP2 `fully_shard` with LoRA, the SFT adapter and SaRA with its nuclear-norm
  term (`fsdp-lora`, `fsdp-sft`, `fsdp-sara`), saved by `al.save` on the sharded model (every rank).
Every run starts from the same weights and trains on the same global batches (each rank takes its
half); rank 0 also repeats each run in one process on the whole global batch.

Only rank 0 writes under OUT: `results.safetensors` (`RUN/rankR/KEY`: rank R's final adapter
tensors; `RUN/initial/KEY` and `RUN/single/KEY`: the single-process reference before and after
training; `RUN/loaded/KEY`: the saved adapter loaded back; `ddp-sara/no-nuclear/KEY`: SaRA trained
without the nuclear-norm term), `report.json` (losses, the saved files' identities, timings) and
one `al.save` directory per DDP and FSDP run.
The test makes the assertions.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from conftest import tiny_llama  # this file's folder is first on sys.path
from safetensors.torch import save_file
from torch import Tensor, nn

import adapterlab as al
from adapterlab.methods import sara
from adapterlab.model import adapter_layers

STEPS, GLOBAL, SEQ, LR, MOMENTUM = 3, 4, 12, 0.5, 0.9
NUCLEAR_WEIGHT = 0.05  # large enough that dropping the term changes the result (the test checks)
METHODS = ("lora", "sft", "sara")
SCHEDULES = {"lora": {}, "sara": {"progressive_step": 1}, "sft": {"full_steps": 1}}  # with AdapterCallback


def global_batches() -> Tensor:
    """(STEPS, GLOBAL, SEQ) token ids, the same in every process."""
    return torch.randint(0, 96, (STEPS, GLOBAL, SEQ), generator=torch.Generator().manual_seed(11))


def random_supports(model: nn.Module, density: float = 0.05) -> None:
    """Give every SFT delta a fixed random support (the same in every process)."""
    gen = torch.Generator().manual_seed(5)
    for _, layer in adapter_layers(model):
        delta = layer.deltas["default"]
        k = max(1, round(density * delta.numel))
        delta.set_support(torch.randperm(delta.numel, generator=gen)[:k].sort().values)


def build(method: str, **options: Any) -> nn.Module:
    """The tiny Llama (seed 0) with adapter "default" of `method` in train mode. `options`: SaRA's
    extra options; for "sft", schedule options (then LT-SFT by schedule, else a fixed random support)."""
    model = tiny_llama()
    if method == "lora":
        al.inject(model, "lora", r=4, targets="all-linear")
    elif method == "sft" and options:
        al.inject(model, "sft", density=0.05, **options)
    elif method == "sft":
        al.inject(model, "sft")
        random_supports(model)
    elif method == "sara":
        al.inject(model, "sara", density=0.05, nuclear_min_dim=8, nuclear_weight=NUCLEAR_WEIGHT, **options)
    return model.train()


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every delta's tensors, keyed `PATH.KEY`; FSDP2 shards are gathered to full tensors."""
    out = {}
    for path, layer in adapter_layers(model):
        for key, t in layer.deltas["default"].state_dict().items():
            if hasattr(t, "full_tensor"):  # a DTensor under FSDP2: a collective, same order on every rank
                t = t.full_tensor()
            out[f"{path}.{key}"] = t.detach().clone()
    return out


def train(
    model: nn.Module, inner: nn.Module, batches: list[Tensor], nuclear: bool = False, schedules: bool = False
) -> list[float]:
    """SGD with momentum on `inner`'s trainable parameters through `model` (a wrapper or `inner`
    itself), one step per batch. `nuclear`: add SaRA's nuclear-norm term to the loss (drawn with a
    generator seeded alike everywhere); `schedules`: call `al.before_step` / `al.after_step` around
    the optimizer step, as `AdapterCallback` does in a Trainer. SGD, not Adam: Adam's update hardly
    depends on the gradient's scale, so it would hide a gradient summed instead of averaged over
    the ranks; SGD's update is proportional to it."""
    opt = torch.optim.SGD([p for p in inner.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(7)
    losses = []
    for step, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        if nuclear:
            loss = loss + sara.nuclear_norm_loss(inner, generator=gen)
        loss.backward()
        if schedules:
            al.before_step(inner, step)
        opt.step()
        if schedules:
            al.after_step(inner, step, opt)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def local(batches: Tensor, rank: int, world: int) -> list[Tensor]:
    """This rank's slice of every global batch."""
    per = batches.shape[1] // world
    return list(batches[:, rank * per : (rank + 1) * per])


class Recorder:
    """Rank 0's results: tensors for `results.safetensors`, facts for `report.json`."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.tensors: dict[str, Tensor] = {}
        self.report: dict = {"world": world, "losses": {}, "saves": {}, "seconds": {}}

    def timed(self, section: str, run: Callable[..., None], *args: Any) -> None:
        """`run(*args)`, with its wall time in the report."""
        start = time.perf_counter()
        run(*args)
        self.report["seconds"][section] = round(time.perf_counter() - start, 2)

    def gather(self, run: str, tensors: dict[str, Tensor]) -> None:
        """Collect every rank's tensors of `run` on rank 0 (all ranks call this)."""
        everyone = [None] * self.world
        dist.all_gather_object(everyone, tensors)
        for r, got in enumerate(everyone):
            self.tensors.update({f"{run}/rank{r}/{k}": v for k, v in got.items()})

    def single_run(
        self, run: str, method: str, batches: list[Tensor], options: dict | None = None, **train_options: Any
    ) -> None:
        """Rank 0's reference: `method` trained in one process on the whole global batches; records
        the adapter before (`RUN/initial/KEY`) and after (`RUN/single/KEY`) and the losses."""
        model = build(method, **(options or {}))
        self.tensors.update({f"{run}/initial/{k}": v for k, v in adapter_tensors(model).items()})
        self.report["losses"][run] = train(model, model, batches, **train_options)
        if method == "sft" and options:
            al.sft.finish(model, "default")  # as AdapterCallback does when training ends
        self.tensors.update({f"{run}/single/{k}": v for k, v in adapter_tensors(model).items()})

    def write(self, out: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, out / "results.safetensors")
        (out / "report.json").write_text(json.dumps(self.report, indent=1))


def save_on_rank0(rec: Recorder, run: str, model: nn.Module, target: Path) -> None:
    """Rank 0 alone saves `model`'s adapter to `target`, records the file's identity (the test checks
    that nothing replaced it later) and loads it back into a fresh model (`RUN/loaded/KEY`). Every
    rank calls this: the barriers around the write catch a write by another rank at the same point."""
    dist.barrier()
    if rec.rank == 0:
        existed = target.exists()
        al.save(model, target)
        record_save(rec, run, target, existed)
    dist.barrier()


def record_save(rec: Recorder, run: str, target: Path, existed: bool) -> None:
    """Rank 0, after a save to `target`: the file's identity in the report, and the adapter loaded
    back into a fresh model among the recorded tensors (`RUN/loaded/KEY`)."""
    st = (target / "adapter_model.safetensors").stat()
    rec.report["saves"][run] = {
        "dir": target.name,
        "existed_before": existed,
        "ino": st.st_ino,
        "mtime_ns": st.st_mtime_ns,
    }
    loaded = al.load(tiny_llama(), target)
    rec.tensors.update({f"{run}/loaded/{k}": v for k, v in adapter_tensors(loaded).items()})


def ddp_runs(rec: Recorder, out: Path) -> None:
    """Plain DDP for each method; rank 0 saves the adapter and repeats the run in one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = global_batches()
    for method in METHODS:
        run = f"ddp-{method}"
        inner = build(method)
        model = DDP(inner)  # after inject: DDP sees the final set of trainable parameters
        train(model, inner, local(batches, rec.rank, rec.world), nuclear=method == "sara")
        rec.gather(run, adapter_tensors(inner))
        save_on_rank0(rec, run, inner, out / run)  # the unwrapped model: DDP's paths start with "module."
        if rec.rank == 0:
            rec.single_run(run, method, list(batches), nuclear=method == "sara")
            if method == "sara":  # the same without the nuclear-norm term: it must make a difference
                plain = build(method)
                train(plain, plain, list(batches))
                rec.tensors.update({f"{run}/no-nuclear/{k}": v for k, v in adapter_tensors(plain).items()})
        dist.barrier()


def trainer_run(rec: Recorder, scratch: Path, run: str, method: str, callback: type | None = None) -> None:
    """`method` through `transformers.Trainer` (with `callback()` if given, which also saves a
    checkpoint at the last step under SCRATCH/RUN). The global batch of every step is recorded on
    each rank; rank 0 replays them in one process with the Trainer's optimizer settings (and, with
    the callback, `al.before_step` / `al.after_step`, which the callback promises to run)."""
    from transformers import Trainer, TrainingArguments

    options = SCHEDULES[method] if callback else {}
    model = build(method, **options)
    samples = list(global_batches().reshape(-1, SEQ))
    seen: list[Tensor] = []

    def collate(features: list[Tensor]) -> dict[str, Tensor]:
        ids = torch.stack(features)
        seen.append(ids)
        return {"input_ids": ids, "labels": ids.clone()}

    args = TrainingArguments(
        output_dir=str(scratch / run),
        use_cpu=True,
        per_device_train_batch_size=GLOBAL // rec.world,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="sgd",
        optim_args=f"momentum={MOMENTUM}",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="steps" if callback else "no",
        save_steps=STEPS,
        save_only_model=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=samples,
        data_collator=collate,
        callbacks=[callback()] if callback else [],
    )
    trainer.train()
    rec.report.setdefault("trainer", {})[run] = {
        "ddp": type(trainer.model_wrapped).__name__,
        "world": trainer.args.world_size,
        "logged_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    rec.gather(run, adapter_tensors(trainer.model))
    everyone = [None] * rec.world
    dist.all_gather_object(everyone, seen[:STEPS])  # the loader may have fetched one batch ahead
    if rec.rank == 0:
        replay = [torch.cat([steps[i] for steps in everyone]) for i in range(STEPS)]
        rec.single_run(run, method, replay, options, schedules=callback is not None)
    dist.barrier()


def fsdp_runs(rec: Recorder, out: Path) -> None:
    """FSDP2 `fully_shard` per decoder layer and at the root, for LoRA, the SFT adapter and SaRA with
    its nuclear-norm term (a DTensor shard of the values, gathered for the term). Every rank calls
    `al.save` on the sharded model (it gathers the adapter's tensors, a collective); rank 0 writes.
    Rank 1 records what its `al.save` did (`fsdp_save`)."""
    from torch.distributed.fsdp import fully_shard

    batches = global_batches()
    for method in METHODS:
        run = f"fsdp-{method}"
        model = build(method)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        train(model, model, local(batches, rec.rank, rec.world), nuclear=method == "sara")
        rec.gather(run, adapter_tensors(model))
        target = out / run
        dist.barrier()
        existed = target.exists()
        returned = al.save(model, target)  # every rank: the gather is a collective
        dist.barrier()
        facts = [None] * rec.world
        dist.all_gather_object(facts, {"returned": str(returned), "existed_before": existed})
        if rec.rank == 0:
            record_save(rec, run, target, existed)
            rec.report.setdefault("fsdp_save", {})[run] = {"target": str(target), "ranks": facts}
            rec.single_run(run, method, list(batches), nuclear=method == "sara")
        dist.barrier()


def main(argv: list[str]) -> None:
    out, scratch = Path(argv[0]), Path(argv[1])
    dist.init_process_group("gloo")
    rec = Recorder(dist.get_rank(), dist.get_world_size())
    rec.timed("first-model", tiny_llama)  # mostly the import of transformers' Llama
    rec.timed("ddp", ddp_runs, rec, out)
    rec.timed("trainer", trainer_run, rec, scratch, "trainer-lora", "lora")
    if "--callback" in argv:
        from adapterlab.integrations import AdapterCallback

        for method in SCHEDULES:
            rec.timed(
                f"trainer-callback-{method}",
                trainer_run,
                rec,
                scratch,
                f"trainer-callback-{method}",
                method,
                AdapterCallback,
            )
    if "--fsdp" in argv:
        rec.timed("fsdp", fsdp_runs, rec, out)
    if rec.rank == 0:
        rec.write(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
