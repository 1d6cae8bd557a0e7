"""`AdapterCallback`: adapterlab's adapters and method schedules under `transformers.Trainer`.

    al.inject(model, "sara", density=0.05, progressive_step=200)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCallback()])
    trainer.train()                               # later: trainer.train(resume_from_checkpoint=True)
    al.save(model, "adapter/")

At each Trainer event:

- init end: every base-model tensor is marked not-to-save (`_keys_to_ignore_on_save`): checkpoints
  hold no base weights, and the Trainer does not warn that a resumed checkpoint lacks them;
- train begin: logs trainable / total parameters (logger "adapterlab");
- pre optimizer step (after backward and gradient clipping): `al.before_step` (SaRA's nuclear-norm
  gradient, LT-SFT's support mask, HFT's frozen half);
- optimizer step (before the gradients are zeroed): `al.after_step` (SaRA's re-selection, LT-SFT's
  phase switch, HFT's stage boundary);
- save: the Trainer's own `save_model` already wrote the adapters into `checkpoint-N/` (an injected
  Hugging Face model's `save_pretrained` writes them, as PEFT lays them out); the callback adds
  `checkpoint-N/model.safetensors` with the adapters' full training state (masks and schedule
  buffers too), which `resume_from_checkpoint` loads through the Trainer's usual path (main
  process only);
- train end: scheduled LT-SFT adapters past their full phase become plain sparse deltas
  (`al.sft.finish`), and `_keys_to_ignore_on_save` is restored.

Schedules never add, remove or reshape parameters during training, so the optimizer the Trainer
built, DDP's buckets and a resumed run all see the same parameters; a schedule's state lives in
the adapters' buffers (masks) and in the step count, both of which the checkpoint holds.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import AdapterNameError
from ..io import save_pretrained, write_files_atomic
from ..methods import sft
from ..model import adapter_layers, adapters, after_step, before_step, trainable_summary

logger = logging.getLogger("adapterlab")
RESUME_FILE = "model.safetensors"  # the name transformers' resume_from_checkpoint reads


class AdapterCallback(TrainerCallback):
    """Runs adapterlab's method schedules in a `Trainer` and keeps its checkpoints adapter-only.
    `finish_sft`: turn scheduled LT-SFT adapters into sparse deltas when training ends."""

    def __init__(self, finish_sft: bool = True) -> None:
        self.finish_sft = finish_sft
        self._ignored: Any = None
        self.summary = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None or not adapters(model):
            raise AdapterNameError("AdapterCallback: the Trainer's model has no adapterlab adapter; "
                             "call al.inject(model, ...) or al.load(model, ...) before building the Trainer")
        self._ignored = getattr(model, "_keys_to_ignore_on_save", None)
        model._keys_to_ignore_on_save = {k for k in model.state_dict() if ".deltas." not in k}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self.summary = trainable_summary(model)
        if state.is_world_process_zero:
            logger.info("adapterlab: %s", self.summary)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs: Any) -> None:
        before_step(model, state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        after_step(model, state.global_step, optimizer)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        if not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            save_pretrained(model, checkpoint)  # done already for Hugging Face models; not for others
            tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".deltas." in k}
            write_files_atomic(checkpoint, {RESUME_FILE: safetensors_bytes(tensors, metadata={"format": "pt"})})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        model._keys_to_ignore_on_save = self._ignored
        if not self.finish_sft:
            return
        for name, config in adapters(model).items():
            if isinstance(config, sft.SFTConfig) and config.full_steps is not None and _phased(model, name):
                if state.global_step >= config.full_steps:
                    sft.finish(model, name)
                else:
                    logger.warning("adapterlab: LT-SFT adapter %r stopped in its full phase (%d of %d steps); "
                                   "it stays dense", name, state.global_step, config.full_steps)


def _phased(model: nn.Module, name: str) -> bool:
    return any(name in layer.deltas and isinstance(layer.deltas[name], sft.PhasedDelta)
               for _, layer in adapter_layers(model))
