"""Adapter module paths mapped to a Hugging Face checkpoint's keys: exact, by dotted suffix, or
(MoE expert weights) by the per-expert keys transformers writes; with the problems `validate` and
`merge` report (missing, ambiguous, tied to the embedding, shapes that differ)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import FingerprintMismatchError, MergeError, TargetError
from .experts import legacy_pieces, pieces_mismatch
from .files.adapter_dir import AdapterFile
from .files.checkpoint_dir import Checkpoint
from .sharing import linear_transposed, tied_heads


@dataclass
class Location:
    """Where each adapter module's weight is in a checkpoint."""

    keys: dict[str, str] = field(default_factory=dict)  # module path -> checkpoint key
    missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # module path -> candidate keys
    # a stacked MoE expert weight saved per expert: path -> [(key, expert, part, parts)] (experts.py)
    pieces: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)


def locate(paths: Iterable[str], keys: Iterable[str]) -> Location:
    """`<path>.weight` if the checkpoint has it, else the one key of which it is a dotted suffix
    (or that is a dotted suffix of it): a leading prefix added or dropped, as between a base model
    class and its task-head class."""
    keys = set(keys)
    by_leaf: dict[str, list[str]] = {}
    for key in keys:
        if key.endswith(".weight"):
            by_leaf.setdefault(key[: -len(".weight")].rsplit(".", 1)[-1], []).append(key)
    out = Location()
    for path in paths:
        want = f"{path}.weight"
        if want in keys:
            out.keys[path] = want
            continue
        if path in keys:  # a stacked MoE expert weight is a parameter of its own (experts.py)
            out.keys[path] = path
            continue
        pieces = legacy_pieces(path, keys)
        if pieces:
            out.pieces[path] = pieces
            continue
        found = sorted(
            k
            for k in by_leaf.get(path.rsplit(".", 1)[-1], [])
            if k.endswith("." + want) or want.endswith("." + k)
        )
        if len(found) == 1:
            out.keys[path] = found[0]
        elif found:
            out.ambiguous[path] = found
        else:
            out.missing.append(path)
    return out


def fit_base(adapter: AdapterFile, base: Checkpoint) -> Location:
    """`locate` the adapter's modules; a PEFT directory's Linear / Conv1D types are decided by the
    checkpoint's weights and architecture, as `al.load` would decide them (`fan_in_fan_out`)."""
    found = locate(adapter.modules, base.tensors)
    shapes = {p: base.tensors[k].shape for p, k in found.keys.items()}
    adapter.fit_base(shapes, linear_transposed(base.root))
    return found


def location_errors(adapter: AdapterFile, base: Checkpoint, found: Location) -> list[str]:
    """One line per problem: tied output heads, missing or ambiguous modules, shapes that differ."""
    tied = tied_heads(adapter.modules, base.root)
    problems = [
        f"{p!r} is tied to the other end (input embedding / output head) in this checkpoint (config.json "
        "tie_word_embeddings): merging into it would change both, and loading re-ties them. Keep the adapter "
        "unmerged (al.load), or untie the model and save it with tie_word_embeddings=False first"
        for p in tied[:3]
    ]
    problems += [
        f"{p!r} has no weight in the checkpoint (looked for {p + '.weight'!r} and keys ending in it)"
        for p in found.missing[:3]
        if p not in tied
    ]
    problems += [f"{p!r} matches several weights {keys[:3]}" for p, keys in list(found.ambiguous.items())[:3]]
    problems += [
        pieces_mismatch(p, adapter.modules[p]["shape"], ps, base.tensors) for p, ps in found.pieces.items()
    ]
    problems = [p for p in problems if p]
    for path, key in found.keys.items():
        want, have = adapter.modules[path]["shape"], base.tensors[key].shape
        if list(want) != have:
            problems.append(
                f"{path!r} has weight shape {list(want)} in the adapter, {key!r} is {have} in the checkpoint"
            )
    return problems


def locate_adapter(adapter: AdapterFile, base: Checkpoint) -> dict[str, str]:
    """{module path: checkpoint key} for every module of `adapter`, or an error saying why not."""
    found = fit_base(adapter, base)
    if found.ambiguous and not found.missing:
        path, keys = next(iter(found.ambiguous.items()))
        raise TargetError(
            f"adapter module {path!r} of {adapter.name!r} matches several checkpoint weights {keys[:3]}; "
            "the adapter's module paths must name the checkpoint's modules (save the adapter from the "
            "model class the checkpoint was saved from)"
        )
    problems = location_errors(adapter, base, found)
    if tied_heads(adapter.modules, base.root):
        raise MergeError(f"{adapter.name!r}: {problems[0]}")
    if problems:
        raise FingerprintMismatchError(
            f"{adapter.name!r} was made for another model than {str(base.root)!r}: "
            f"{'; '.join(problems[:3])}. Use the base model the adapter was trained on"
        )
    return found.keys
