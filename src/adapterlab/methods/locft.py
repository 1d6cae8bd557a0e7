"""LocFT-BF, localized fine-tuning for model editing (2025; official code ICT-STAR/LocFT): one
module of one layer trains as a dense delta; `edit` (breadth- or depth-first) and `evaluate`
(reliability, generalization, locality). docs/methods/locft.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TargetSpec, register
from ..errors import ConfigError, TargetError, closest
from ..targeting import layer_stacks, logical_modules
from .dense import DenseConfig, dense_kind

IGNORE = -100


@register
@dataclass
class LocFTConfig(DenseConfig):
    """The edit location: `module` (a path relative to one layer) in layer `layer` (negative counts
    from the end) of the model's layer list (`stack`, found automatically when None). `targets` is
    filled in by `inject` with the one module path."""

    method = "locft"
    summary_fields = ("layer", "module")
    targets: TargetSpec = "all"
    layer: int | None = None
    module: str = "mlp.down_proj"
    stack: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool)):
            raise ConfigError(
                f"locft: layer={self.layer!r} must be an integer layer index (negative counts from the end)"
            )
        if not isinstance(self.module, str) or not self.module:
            raise ConfigError(
                f"locft: module={self.module!r} must be a module path inside a layer, e.g. 'mlp.down_proj'"
            )
        if self.stack is not None and (not isinstance(self.stack, str) or not self.stack):
            raise ConfigError(
                f"locft: stack={self.stack!r} must be the path of the layer list, e.g. 'model.layers'"
            )

    def for_model(self, model: nn.Module) -> LocFTConfig:
        if isinstance(self.targets, list):  # resolved already (e.g. loaded from a file)
            return self
        return dataclasses.replace(self, targets=[edit_location(model, self.layer, self.module, self.stack)])


def edit_location(model: nn.Module, layer: int | None, module: str, stack: str | None = None) -> str:
    """The full path of `module` in layer `layer`; errors name the valid range or candidates."""
    stacks, modules = layer_stacks(model), dict(logical_modules(model))
    if stack is not None:
        if stack not in stacks:
            raise TargetError(
                f"locft: stack={stack!r} is not a numbered layer list of this model; "
                f"layer lists: {list(stacks) or 'none'}"
            )
        found = {stack: stacks[stack]}
    else:
        found = {s: paths for s, paths in stacks.items() if any(f"{p}.{module}" in modules for p in paths)}
    if not found:
        inside = sorted(
            {
                p[len(first) + 1 :]
                for first in (paths[0] for paths in stacks.values())
                for p, m in modules.items()
                if p.startswith(first + ".") and dense_kind(m)
            }
        )
        raise TargetError(
            f"locft: module={module!r} is in no layer of this model "
            f"(closest: {closest(module, inside)}); modules inside a layer: {inside[:20]}"
        )
    if len(found) > 1:
        raise TargetError(
            f"locft: module={module!r} is in several layer lists {list(found)}; pass stack= one of them"
        )
    ((stack_path, paths),) = found.items()
    n = len(paths)
    if layer is None:
        raise ConfigError(
            f"locft: pass layer= (the layer to edit, 0..{n - 1} for {stack_path!r}); the paper edits "
            "layer 22 of 32 in Llama-3-8B and layer 6 of 28 in Qwen2.5-7B"
        )
    if not -n <= layer < n:
        raise ConfigError(
            f"locft: layer={layer} is out of range; {stack_path!r} has {n} layers (0..{n - 1}, or -{n}..-1)"
        )
    path = f"{paths[layer]}.{module}"
    if path not in modules:
        inside = [p[len(paths[layer]) + 1 :] for p in modules if p.startswith(paths[layer] + ".")]
        raise TargetError(
            f"locft: layer {paths[layer]!r} has no module {module!r} (closest: {closest(module, inside)})"
        )
    return path


# -- edit requests --------------------------------------------------------------------------------
@dataclass
class EditRequest:
    """One edit: `prompt` should continue with `target`. `paraphrases` should too (generalization);
    `locality` prompts are unrelated and should keep the pre-edit output."""

    prompt: str
    target: str
    paraphrases: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)


def as_requests(requests: Iterable[EditRequest | dict[str, Any]]) -> list[EditRequest]:
    """Check and normalise edit requests (dicts with the same keys are accepted)."""
    out: list[EditRequest] = []
    for i, req in enumerate(requests):
        if isinstance(req, dict):
            unknown = set(req) - {f.name for f in dataclasses.fields(EditRequest)}
            if unknown:
                raise ConfigError(
                    f"edit request {i} has unknown key(s) {sorted(unknown)}; "
                    "use prompt, target, paraphrases, locality"
                )
            given: dict[str, Any] = {
                "prompt": req.get("prompt"),
                "target": req.get("target"),
                **{k: list(req[k]) for k in ("paraphrases", "locality") if k in req},
            }
            req = EditRequest(**given)
        for key in ("prompt", "target"):
            value = getattr(req, key, None)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    f"edit request {i} has {key}={value!r}; each request needs a non-empty prompt "
                    "and target, e.g. {'prompt': 'The capital of France is', 'target': 'Paris'}"
                )
        out.append(req)
    if not out:
        raise ConfigError("no edit requests given; pass a list of {'prompt': ..., 'target': ...}")
    return out


def _encode(tokenizer: Any, req: EditRequest) -> tuple[list[int], list[int]]:
    """Prompt ids and target ids (" " + target, then EOS when the tokenizer has one)."""
    prompt = tokenizer(req.prompt)["input_ids"]
    target = tokenizer(" " + req.target, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    return prompt, target + ([eos] if eos is not None else [])


def _collate(
    pairs: Sequence[tuple[list[int], list[int]]], pad: int, device: torch.device
) -> dict[str, Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside the target)."""
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        seq = p + t
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(p) : len(seq)] = torch.tensor(t)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def target_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the target tokens given everything before them, averaged as the official
    code does: over each example's target tokens first, then over the examples of the batch (so a
    long target weighs as much as a short one, not in proportion to its token count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    counts = (labels != IGNORE).sum(1)
    if bool((counts == 0).any()):
        raise ConfigError("locft: an edit request has no target tokens; give each request a non-empty target")
    return (per_token.sum(1) / counts).mean()


# -- editing --------------------------------------------------------------------------------------
@dataclass
class EditReport:
    """What `edit` did: optimizer `steps`, `skipped` batches (loss already below the threshold),
    `epochs` run, the mean loss per epoch (breadth-first) or the last loss per edit (depth-first) in
    `losses`, `final_loss` (mean over all edits after editing) and wall-clock `seconds`."""

    strategy: str
    steps: int
    skipped: int
    epochs: int
    losses: list[float]
    final_loss: float
    seconds: float


def edit(
    model: nn.Module,
    tokenizer: Any,
    requests: Iterable[EditRequest | dict[str, Any]],
    *,
    layer: int | None = None,
    module: str = "mlp.down_proj",
    name: str = "locft",
    strategy: Literal["breadth_first", "depth_first"] = "breadth_first",
    lr: float = 5e-4,
    batch_size: int = 100,
    epochs: int = 25,
    loss_threshold: float = 1e-2,
    seed: int = 0,
) -> EditReport:
    """Apply `requests` to `model` by training adapter `name` (a LocFT location, injected at
    `layer`/`module` unless the model has it already). Defaults are the official recipe's."""
    from ..model import adapters, deltas, inject

    reqs = as_requests(requests)
    if strategy not in ("breadth_first", "depth_first"):
        raise ConfigError(f"locft: strategy={strategy!r}; use 'breadth_first' (LocFT-BF) or 'depth_first'")
    for key, value in (("batch_size", batch_size), ("epochs", epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"locft: {key}={value!r} must be an integer >= 1")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"locft: lr={lr!r} must be a positive number (the paper uses 5e-4 for Qwen2.5-7B)")
    existing = adapters(model).get(name)
    if existing is None:
        inject(model, LocFTConfig(layer=layer, module=module), name=name)
    elif not isinstance(existing, LocFTConfig):
        raise ConfigError(f"locft: adapter {name!r} is a {existing.method!r} adapter; pass another name")
    elif layer is not None and [edit_location(model, layer, module)] != existing.targets:
        raise ConfigError(
            f"locft: adapter {name!r} edits {existing.targets[0]!r}, not layer={layer} "
            f"module={module!r}; pass another name for another location (or layer=None to keep "
            "editing this one)"
        )
    params = [p for _, _, delta in deltas(model, name) for p in delta.parameters()]
    for p in params:
        p.requires_grad_(True)
    device = params[0].device
    pad = next(
        (
            t
            for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
            if t is not None
        ),
        0,
    )
    encoded = [_encode(tokenizer, r) for r in reqs]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.eval()  # no dropout while editing: the frozen model is the one being edited
    start, steps, skipped, losses, epochs_run = time.perf_counter(), 0, 0, [], 0

    def step(indices: Sequence[int]) -> float:
        nonlocal steps, skipped
        loss = target_loss(model, _collate([encoded[i] for i in indices], pad, device))
        if loss.item() < loss_threshold:
            skipped += 1
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        return loss.item()

    try:
        if strategy == "breadth_first":
            gen = torch.Generator().manual_seed(seed)
            for epochs_run in range(1, epochs + 1):  # noqa: B007 - read after the loop
                order = torch.randperm(len(reqs), generator=gen).tolist()
                batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
                # the epoch's loss: batch losses weighted by batch size (the official AverageMeter)
                losses.append(sum(step(c) * len(c) for c in batches) / len(reqs))
                if losses[-1] < loss_threshold:
                    break
        else:
            epochs_run = 1  # one pass over the edits, each trained for up to `epochs` steps
            for i in range(len(reqs)):
                for _ in range(epochs):
                    loss = step([i])
                    if loss < loss_threshold:
                        break
                losses.append(loss)
        with torch.no_grad():
            chunks = [range(i, min(i + batch_size, len(reqs))) for i in range(0, len(reqs), batch_size)]
            final = sum(
                target_loss(model, _collate([encoded[j] for j in c], pad, device)).item() * len(c)
                for c in chunks
            ) / len(reqs)
    finally:
        model.train(was_training)
    return EditReport(strategy, steps, skipped, epochs_run, losses, final, time.perf_counter() - start)


# -- evaluation -----------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: the exact-match normal form."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def greedy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int | Sequence[int]
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped), stopping at EOS. Prompts of equal
    token length run as one batch, so no padding can change a result."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    eos = getattr(tokenizer, "eos_token_id", None)
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    generated: list[list[int]] = [[] for _ in prompts]
    for rows in by_length.values():
        seq = torch.tensor([encoded[i] for i in rows], device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for t in range(max(limits[i] for i in rows)):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1)
            for k, i in enumerate(rows):
                if done[k] or t >= limits[i] or eos is not None and int(nxt[k]) == eos:
                    done[k] = True
                else:
                    generated[i].append(int(nxt[k]))
            if bool(done.all()):
                break
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    requests: Iterable[EditRequest | dict[str, Any]],
    locality_tokens: int = 8,
) -> dict[str, float | int | None]:
    """Reliability, generalization and locality (fractions in [0, 1]; None where a request set has
    no paraphrases / locality prompts) by greedy decoding and normalised exact match. A target is
    decoded for up to its own token count + 1 (room for EOS); locality prompts for
    `locality_tokens`, compared with the output of the model with adapters disabled."""
    from ..model import disabled

    reqs = as_requests(requests)
    was_training = model.training
    model.eval()
    try:

        def length(target: str) -> int:
            return len(tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + 1

        def score(pairs: list[tuple[str, str]]) -> float | None:
            if not pairs:
                return None
            outs = greedy(model, tokenizer, [p for p, _ in pairs], [length(t) for _, t in pairs])
            return sum(normalize(o) == normalize(t) for o, (_, t) in zip(outs, pairs, strict=True)) / len(
                pairs
            )

        reliability = score([(r.prompt, r.target) for r in reqs])
        generalization = score([(p, r.target) for r in reqs for p in r.paraphrases])
        unrelated = [p for r in reqs for p in r.locality]
        locality = None
        if unrelated:
            after = greedy(model, tokenizer, unrelated, locality_tokens)
            with disabled(model):
                before = greedy(model, tokenizer, unrelated, locality_tokens)
            locality = sum(normalize(a) == normalize(b) for a, b in zip(after, before, strict=True)) / len(
                unrelated
            )
    finally:
        model.train(was_training)
    return {
        "reliability": reliability,
        "generalization": generalization,
        "locality": locality,
        "edits": len(reqs),
        "paraphrases": sum(len(r.paraphrases) for r in reqs),
        "locality_prompts": len(unrelated),
    }
