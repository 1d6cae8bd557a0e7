"""`AdapterCallback` for `transformers.Trainer`: runs the methods' step schedules and train-end
hooks, and keeps checkpoints adapter-only (resumable). docs/training.md.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCallback()])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import AdapterNameError
from ..files.atomic import write_files_atomic
from ..io import save_pretrained
from ..model import Summary, adapters, after_step, before_step, trainable_summary
from ..running_stats import is_running_stat

logger = logging.getLogger("adapterlab")
RESUME_FILE = "model.safetensors"  # the name transformers' resume_from_checkpoint reads


class AdapterCallback(TrainerCallback):
    """Runs adapterlab's method schedules in a `Trainer` and keeps its checkpoints adapter-only.
    `finish_sft`: when training ends, run each adapter's `train_end` (scheduled LT-SFT adapters
    become plain sparse deltas)."""

    def __init__(self, finish_sft: bool = True) -> None:
        self.finish_sft = finish_sft
        self._ignored: Any = None
        self.summary: Summary | None = None

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None or not adapters(model):
            raise AdapterNameError(
                "AdapterCallback: the Trainer's model has no adapterlab adapter; "
                "call al.inject(model, ...) or al.load(model, ...) before building the Trainer"
            )
        self._ignored = getattr(model, "_keys_to_ignore_on_save", None)
        # transformers' attribute; torch's stubs type every module attribute as Tensor | Module
        model._keys_to_ignore_on_save = {  # type: ignore[assignment]
            k for k in model.state_dict() if ".deltas." not in k
        }

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self.summary = trainable_summary(_given(model))
        if state.is_world_process_zero:
            logger.info("adapterlab: %s", self.summary)

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        before_step(_given(model), state.global_step)

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        after_step(_given(model), state.global_step, optimizer)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not args.should_save:
            return
        model = _given(model)
        # TrainingArguments.__post_init__ sets output_dir ("trainer_output") when it is None
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"  # type: ignore[arg-type]
        if checkpoint.is_dir():
            if "save_pretrained" not in model.__dict__:  # a Hugging Face model's (ours) wrote them already
                save_pretrained(model, checkpoint)
            tensors = {
                k: v.detach().contiguous().cpu()
                for k, v in model.state_dict().items()
                if ".deltas." in k or is_running_stat(k)  # BatchNorm statistics move in training
            }
            write_files_atomic(
                checkpoint, {RESUME_FILE: safetensors_bytes(tensors, metadata={"format": "pt"})}
            )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        model = _given(model)
        model._keys_to_ignore_on_save = self._ignored
        if self.finish_sft:
            for name, config in adapters(model).items():
                config.train_end(model, name, state.global_step)


def _given(model: nn.Module | None) -> nn.Module:
    """The model the Trainer passes to every event (on_init_end checked that it has adapters)."""
    if model is None:
        raise AdapterNameError(
            "AdapterCallback: the Trainer passed no model to this event; pass the adapted model to "
            "Trainer(model=...)"
        )
    return model
