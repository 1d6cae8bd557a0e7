"""Adapter module paths mapped to a Hugging Face checkpoint's keys: exact, by dotted suffix, or
(MoE expert weights) by the per-expert keys transformers writes, all through the names
transformers loads the keys as (keymap.py); with the problems `validate` and `merge` report
(missing, ambiguous, tied to the embedding, built by a conversion, shapes that differ)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import FingerprintMismatchError, MergeError, TargetError
from .experts import legacy_pieces, pieces_mismatch
from .files.adapter_dir import AdapterFile
from .files.checkpoint_dir import Checkpoint
from .keymap import KeyMap, key_map
from .sharing import linear_transposed, tied_heads


@dataclass
class Location:
    """Where each adapter module's weight is in a checkpoint."""

    keys: dict[str, str] = field(default_factory=dict)  # module path -> checkpoint key
    missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # module path -> candidate keys
    # a stacked MoE expert weight saved per expert: path -> [(key, expert, part, parts)] (experts.py)
    pieces: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)
    # a weight transformers builds by a conversion, not a rename (keymap.py): path -> what builds it
    converted: dict[str, str] = field(default_factory=dict)


def locate(paths: Iterable[str], keys: Iterable[str], names: KeyMap | None = None) -> Location:
    """`<path>.weight` if the checkpoint loads a weight by that name, else the one weight of which
    it is a dotted suffix (or that is a dotted suffix of it): a leading prefix added or dropped, as
    between a base model class and its task-head class. `names` maps the names the model loads to
    the checkpoint's keys (keymap.py: transformers' load-time renaming); the identity by default.
    A weight that transformers builds by a conversion rather than a rename is `converted`."""
    keys = set(keys)
    names = KeyMap.identity(keys) if names is None else names
    by_leaf: dict[str, list[str]] = {}
    for name in (*names.names, *names.converted, *names.clashes):
        if name.endswith(".weight"):
            by_leaf.setdefault(name[: -len(".weight")].rsplit(".", 1)[-1], []).append(name)
    out = Location()
    for path in paths:
        want = f"{path}.weight"
        exact = want if want in names.names else path if path in names.names else None
        if exact is not None:  # a stacked MoE expert weight is a parameter of its own (experts.py)
            out.keys[path] = names.names[exact]
            continue
        pieces = legacy_pieces(path, keys)
        if pieces:
            out.pieces[path] = pieces
            continue
        found = sorted(
            k
            for k in by_leaf.get(path.rsplit(".", 1)[-1], [])
            if k == want or k.endswith("." + want) or want.endswith("." + k)
        )
        if path in names.converted:
            found = [path]
        if len(found) == 1 and found[0] in names.names:
            out.keys[path] = names.names[found[0]]
        elif len(found) == 1 and found[0] in names.converted:
            out.converted[path] = f"{found[0]!r} is built by {names.converted[found[0]]}"
        elif found:
            out.ambiguous[path] = [c for k in found for c in names.clashes.get(k, [names.names.get(k, k)])]
        else:
            out.missing.append(path)
    return out


def located(paths: Iterable[str], base: Checkpoint) -> Location:
    """`locate` against a checkpoint directory, with the names transformers loads its keys as; a
    path not found by those is looked up among the keys as they are (an adapter trained where
    transformers did not rename them, e.g. with transformers 4)."""
    found = locate(paths, base.tensors, key_map(base.root, base.tensors))
    if found.missing:
        again = locate(found.missing, base.tensors)
        found.keys.update(again.keys)
        found.pieces.update(again.pieces)
        found.ambiguous.update(again.ambiguous)
        found.missing = again.missing
    return found


def fit_base(adapter: AdapterFile, base: Checkpoint) -> Location:
    """`locate` the adapter's modules; a PEFT directory's Linear / Conv1D types are decided by the
    checkpoint's weights and architecture, as `al.load` would decide them (`fan_in_fan_out`)."""
    found = located(adapter.modules, base)
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
    problems += [conversion_problem(p, how) for p, how in list(found.converted.items())[:3]]
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


def conversion_problem(path: str, how: str) -> str:
    """Why module `path`, whose weight transformers builds from the checkpoint by a conversion, is
    neither merged nor checked."""
    return (
        f"{path!r} has no weight of its own in the checkpoint: transformers' from_pretrained builds it by a "
        f"conversion, not a rename ({how}), which adapterlab does not invert. Merge in Python instead: "
        "from_pretrained, al.load, al.merge, save_pretrained (transformers writes the conversion back)"
    )


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
    if found.converted:
        path, how = next(iter(found.converted.items()))
        raise MergeError(f"{adapter.name!r}: {conversion_problem(path, how)}")
    problems = location_errors(adapter, base, found)
    if tied_heads(adapter.modules, base.root):
        raise MergeError(f"{adapter.name!r}: {problems[0]}")
    if problems:
        raise FingerprintMismatchError(
            f"{adapter.name!r} was made for another model than {str(base.root)!r}: "
            f"{'; '.join(problems[:3])}. Use the base model the adapter was trained on"
        )
    return found.keys
