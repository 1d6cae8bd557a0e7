"""Hostile files, round 2 (issue 15), classes 1 and 2, through the real CLI (in process):

1. special files — a FIFO, a socket, a symlink to /dev/zero, /dev/null or /dev/urandom, a directory
   or a symlink loop where a file belongs (adapter config and weights, base shards and index, the
   combine YAML) are a one-line error from every command, never a hang or an unbounded read;
2. base checkpoints are read as strictly as adapters — every corruption of a shard header or the
   shard index is a one-line error from `merge` and `validate`, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_llama
from hostile import (
    SPECIAL_KINDS,
    alarm,
    build_inputs,
    cli,
    float_names,
    join,
    make_special,
    merged_equals_al_merge,
    one_line_error,
    snapshot,
    split,
)

import adapterlab as al

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    build_inputs(root)
    return root


@pytest.fixture
def work(inputs, tmp_path) -> Path:
    """A fresh copy of the inputs, to damage."""
    shutil.copytree(inputs, tmp_path / "in", symlinks=True)
    return tmp_path / "in"


def commands(w: Path) -> dict[str, list]:
    a, b = w / "lora_a", w / "base"
    out = w.parent
    return {
        "inspect": ["inspect", a],
        "validate": ["validate", a, "--base", b],
        "merge": ["merge", "--base", b, "--adapter", a, "--out", out / "merged"],
        "export_peft": ["export", a, "--format", "peft", "--out", out / "peft"],
        "export_dense": ["export", a, "--format", "dense", "--out", out / "dense.safetensors"],
        "combine": ["combine", w / "combine.yaml"],
    }


def first_shard(base: Path) -> str:
    return sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))[0]


PLACES = {
    "adapter config": ("lora_a/adapter_config.json", "all"),
    "adapter weights": ("lora_a/adapter_model.safetensors", "all"),
    "base shard": ("base/SHARD", ("validate", "merge")),
    "base index": (f"base/{INDEX}", ("validate", "merge")),
    "combine yaml": ("combine.yaml", ("combine",)),
}


# -- 1. special files ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("place", sorted(PLACES))
def test_a_special_file_where_a_file_belongs_is_a_one_line_error_everywhere(work, place, kind, capsys):
    """Each command that reads the file ends within the alarm with exit 1 and one line naming
    the path; nothing under the inputs changes and no output appears."""
    relative, which = PLACES[place]
    target = work / relative.replace("SHARD", first_shard(work / "base"))
    make_special(target, kind)
    before = snapshot(work)
    todo = commands(work)
    for name in todo if which == "all" else which:
        code, err, out = cli(todo[name], capsys)
        line = one_line_error(code, err)
        assert target.name in line + out, (name, line, out)
        assert snapshot(work) == before, name
    assert not [p.name for p in work.parent.iterdir() if p.name != "in"]
    if which == "all":  # the library's loader too
        with alarm(), pytest.raises(al.AdapterlabError, match=target.name):
            al.load(tiny_llama(layers=1), work / "lora_a")


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_special_files_among_a_bases_extra_files_are_left_out_of_the_merge(work, kind, capsys):
    """A FIFO (or /dev/zero link, …) as the base's tokenizer.json: the merge does not read it,
    succeeds, and the output has every regular extra file but not that one."""
    base = work / "base"
    make_special(base / "tokenizer.json", kind)
    out = work.parent / "merged"
    code, err, _ = cli(["merge", "--base", base, "--adapter", work / "lora_a", "--out", out], capsys)
    assert code == 0, err
    assert not os.path.lexists(out / "tokenizer.json") and (out / "config.json").is_file()
    assert merged_equals_al_merge(out, base, work / "lora_a")


def test_oversized_json_is_refused_without_reading_it_all(work, capsys, monkeypatch):
    """JSON reads are bounded: an index over the limit is an error naming it (the limit is
    lowered here to 1 kB so the test need not write 64 MiB)."""
    from adapterlab.files import fs

    monkeypatch.setattr(fs, "MAX_JSON_BYTES", 1024)
    monkeypatch.setattr(fs.read_regular, "__defaults__", ("file", 1024))
    index = work / "base" / INDEX
    data = json.loads(index.read_text())
    data["metadata"]["padding"] = "x" * 4096
    index.write_text(json.dumps(data))
    code, err, _ = cli(["validate", work / "lora_a", "--base", work / "base"], capsys)
    one_line_error(code, err, INDEX, "over 1024 bytes")


# -- 2. base checkpoints, strictly ---------------------------------------------------------------
def edit_shard(edit):
    """A damage that rewrites the header (and data) of the shard holding the most float tensors."""

    def damage(base: Path) -> None:
        shards = sorted(base.glob("model-*.safetensors"))
        shard = max(shards, key=lambda s: len(float_names(split(s.read_bytes())[0])))
        header, data = split(shard.read_bytes())
        shard.write_bytes(edit(header, data))

    return damage


def edit_entry(field, value, which=0):
    def edit(header, data):
        header[float_names(header)[which]][field] = value
        return join(header, data)

    return edit_shard(edit)


def edit_index(edit):
    def damage(base: Path) -> None:
        index = json.loads((base / INDEX).read_text())
        edit(index)
        (base / INDEX).write_text(json.dumps(index))

    return damage


def _halve(header, data):
    entry = header[float_names(header)[0]]
    entry["shape"] = [entry["shape"][0] // 2, *entry["shape"][1:]]
    return join(header, data)


def _zero_range(header, data):
    entry = header[float_names(header)[0]]
    entry["data_offsets"] = [entry["data_offsets"][0]] * 2
    return join(header, data)


def _overlap(header, data):
    names = float_names(header)
    same = [n for n in names[1:] if header[n]["shape"] == header[names[0]]["shape"]]
    target = same[0] if same else names[1]
    header[target]["data_offsets"] = list(header[names[0]]["data_offsets"])
    header[target]["shape"] = header[names[0]]["shape"]
    return join(header, data)


def _swap_offsets(header, data):
    names = [n for n in float_names(header) if "norm" in n]
    a, b = next((x, y) for x in names for y in names if x < y and header[x]["shape"] == header[y]["shape"])
    header[a]["data_offsets"], header[b]["data_offsets"] = (
        header[b]["data_offsets"],
        header[a]["data_offsets"],
    )
    header[a]["shape"], header[b]["shape"] = header[b]["shape"], header[a]["shape"]
    header[a]["dtype"], header[b]["dtype"] = header[b]["dtype"], header[a]["dtype"]
    return join(header, data)  # still valid: the tensors trade places (control, must merge)


def _wrong_shard(index):
    key = next(iter(index["weight_map"]))
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})
    index["weight_map"][key] = others[0]


CORRUPTIONS = {
    "range longer than the shape": edit_shard(_halve),
    "zero-byte range for a non-empty shape": edit_shard(_zero_range),
    "two tensors on one byte range": edit_shard(_overlap),
    "negative data_offsets": edit_entry("data_offsets", [-8, 120]),
    "offsets past the end": edit_entry("data_offsets", [0, 2**40]),
    "offsets of the wrong type": edit_entry("data_offsets", "0-128"),
    "three offsets": edit_entry("data_offsets", [0, 4, 8]),
    "unknown dtype": edit_entry("dtype", "F17"),
    "dtype of another size": edit_entry("dtype", "F64"),
    "dtype not a string": edit_entry("dtype", 32),
    "boolean shape": edit_entry("shape", [True, 32]),
    "negative shape": edit_entry("shape", [-1, 32]),
    "nine dimensions": edit_entry("shape", [1] * 9),
    "entry not an object": edit_shard(lambda h, d: join({**h, float_names(h)[0]: [1, 2]}, d)),
    "__metadata__ a list": edit_shard(lambda h, d: join({**h, "__metadata__": []}, d)),
    "__metadata__ zero": edit_shard(lambda h, d: join({**h, "__metadata__": 0}, d)),
    "__metadata__ empty string": edit_shard(lambda h, d: join({**h, "__metadata__": ""}, d)),
    "__metadata__ with a number": edit_shard(lambda h, d: join({**h, "__metadata__": {"format": 1}}, d)),
    "header a list": edit_shard(lambda h, d: join([1], d)),
    "trailing bytes": edit_shard(lambda h, d: join(h, d + b"\0" * 8)),
    "truncated data": edit_shard(lambda h, d: join(h, d[:-4])),
    "header length past the end": edit_shard(lambda h, d: (2**40).to_bytes(8, "little") + join(h, d)[8:]),
    "header not JSON": edit_shard(lambda h, d: (8).to_bytes(8, "little") + b"{not js}" + d),
    "index not JSON": lambda base: (base / INDEX).write_text("{weight_map"),
    "index a list": lambda base: (base / INDEX).write_text("[]"),
    "index without weight_map": edit_index(lambda i: i.pop("weight_map")),
    "weight_map a list": edit_index(lambda i: i.__setitem__("weight_map", list(i["weight_map"]))),
    "weight_map empty": edit_index(lambda i: i.__setitem__("weight_map", {})),
    "shard names not strings": edit_index(
        lambda i: i["weight_map"].update(dict.fromkeys(i["weight_map"], 1))
    ),
    "a shard name null": edit_index(lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), None)),
    "a shard name a list": edit_index(lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), [])),
    "shard name with ..": edit_index(
        lambda i: i["weight_map"].__setitem__(
            next(iter(i["weight_map"])), "../lora_a/adapter_model.safetensors"
        )
    ),
    "absolute shard name": edit_index(
        lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), "/etc/hostname")
    ),
    "shard name with a directory": edit_index(
        lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), "sub/model.safetensors")
    ),
    "missing shard": edit_index(
        lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), "model-9-of-9.safetensors")
    ),
    "index puts a tensor in the wrong shard": edit_index(_wrong_shard),
    "index names a tensor no shard has": edit_index(
        lambda i: i["weight_map"].__setitem__("ghost.weight", "x")
    ),
    "index leaves a tensor out": edit_index(lambda i: i["weight_map"].pop(next(iter(i["weight_map"])))),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_base_is_refused_by_merge_and_validate(work, corruption, capsys):
    """`merge` and `validate` exit 1 with one line; merge writes nothing; the inputs stay."""
    base = work / "base"
    CORRUPTIONS[corruption](base)
    before = snapshot(work)
    out = work.parent / "merged"
    code, err, _ = cli(["merge", "--base", base, "--adapter", work / "lora_a", "--out", out], capsys)
    one_line_error(code, err)
    assert not os.path.lexists(out) and [p.name for p in work.parent.iterdir()] == ["in"]
    code, err, _ = cli(["validate", work / "lora_a", "--base", base], capsys)
    one_line_error(code, err)
    assert snapshot(work) == before


def test_a_base_whose_tensors_trade_places_is_still_valid_and_merges_exactly(work, capsys):
    """The control for the table above: a legal header rewrite (two tensors' entries swapped,
    data untouched: the file now says each is where the other is) still merges — strictness
    refuses only what is broken."""
    edit_shard(_swap_offsets)(work / "base")
    out = work.parent / "merged"
    code, err, _ = cli(["merge", "--base", work / "base", "--adapter", work / "lora_a", "--out", out], capsys)
    assert code == 0, err
    code, err, _ = cli(["validate", work / "lora_a", "--base", work / "base"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_a_special_file_where_a_directory_belongs_says_what_it_is(work, kind, capsys):
    """The adapter or base directory itself replaced by a special file (a real directory, the
    control, is only refused for holding nothing)."""
    thing = work.parent / "thing"
    make_special(thing, kind)
    for args in (
        ["inspect", thing],
        ["merge", "--base", thing, "--adapter", work / "lora_a", "--out", work / "o"],
    ):
        code, err, _ = cli(args, capsys)
        line = one_line_error(code, err, "thing")
        if kind not in ("dir", "null", "zero", "random"):
            assert {"fifo": "FIFO", "socket": "socket", "loop": "symbolic links"}[kind] in line, line
    assert not os.path.lexists(work / "o")
