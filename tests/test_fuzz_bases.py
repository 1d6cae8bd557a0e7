"""Fuzz, round 2 (issue 15): hostile base checkpoints and hostile directory entries.

Surfaces:
- `merge` and `validate` on mutated copies of a tiny sharded Llama checkpoint (header fields,
  offsets, dtypes, shapes, `__metadata__`, header lengths, truncations, appended bytes, bit flips,
  the shard index's JSON, files removed or replaced);
- every command (`inspect`, `validate`, `merge`, `export` both formats, `combine`, `al.load`) on
  adapter and base directories holding special files and symlinks (FIFOs, sockets, links to
  /dev/zero, loops, links leading outside, to the other input, to a sibling, dangling).

Every outcome is success or a one-line `AdapterlabError` (exit 1 with one `adapterlab: error:`
line): no other exception, no hang (a SIGALRM per call), no byte or mtime changed outside OUT, no
content of a file outside the inputs copied into OUT. CI runs FUZZ_EXAMPLES per surface (default
70, the variable of tests/test_fuzz.py); a long run:
    ADAPTERLAB_FUZZ_EXAMPLES=3000 python -m pytest -q -s tests/test_fuzz_bases.py
(-s prints how the examples ended).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_llama
from hostile import SPECIAL_KINDS, alarm, build_inputs, join, make_special, snapshot, split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterlab as al
from adapterlab.cli import main

FUZZ_EXAMPLES = int(os.environ.get("ADAPTERLAB_FUZZ_EXAMPLES", "70"))
OUTCOMES: collections.Counter = collections.Counter()
INDEX = "model.safetensors.index.json"
SECRET = "SECRET-FROM-OUTSIDE-THE-INPUTS"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if OUTCOMES:
        print(f"\nfuzz bases: {sum(OUTCOMES.values())} examples: {dict(sorted(OUTCOMES.items()))}")


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-bases")
    build_inputs(root)
    (root.parent / "outside.txt").write_text(SECRET)
    return root


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def fresh(seed: Path, work: Path) -> Path:
    """`work` emptied and refilled with a copy of the seed inputs (outputs live beside it)."""
    if work.exists():
        shutil.rmtree(work)
    for leftover in work.parent.iterdir():
        if leftover.name != "outside.txt" and leftover != work:
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
    shutil.copytree(seed, work, symlinks=True)
    return work


# -- mutations of a base checkpoint --------------------------------------------------------------
VALUES = st.sampled_from(
    [None, True, False, 0, 1, -1, -8, 7, 2**31, 2**63, 2**64, 1.5, float("inf"), "", "F17", "F32", "BF16",
     "I64", "BOOL", "../x", "/etc/hostname", "model.safetensors", [], [0], [-1, 2], [0, 2**40], [True],
     [1] * 9, [2, 2], [0, 0], {}, {"a": 1}, {"format": "pt"}, {"dtype": "F32"}]
)  # fmt: skip
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])
mutations = st.one_of(
    st.tuples(st.just("entry"), st.integers(0, 99), st.integers(0, 99), FIELDS, VALUES),
    st.tuples(st.just("metadata"), st.integers(0, 99), VALUES),
    st.tuples(st.just("header_length"), st.integers(0, 99), st.sampled_from([0, 1, 7, 2**20, 2**63, -1])),
    st.tuples(st.just("truncate"), st.integers(0, 99), st.floats(0, 1)),
    st.tuples(st.just("append"), st.integers(0, 99), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("flip"), st.integers(0, 99), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(
        st.just("index"), st.sampled_from(["key", "value", "weight_map", "drop", "add", "text"]), VALUES
    ),
    st.tuples(st.just("remove"), st.integers(0, 99)),
)


def shard_names(files: dict[str, bytes]) -> list[str]:
    return sorted(n for n in files if n.endswith(".safetensors"))


def edit_header(files: dict[str, bytes], i: int, edit) -> None:
    name = shard_names(files)[i % len(shard_names(files))]
    try:
        header, data = split(files[name])
    except ValueError:
        return  # an earlier mutation broke it already
    if isinstance(header, dict):
        edit(header)
        files[name] = join(header, data)


def mutate(files: dict[str, bytes], m: tuple) -> None:
    import json

    kind, *args = m
    names = shard_names(files)
    if kind == "entry":
        i, j, field, value = args

        def edit(header):
            keys = sorted(k for k in header if k != "__metadata__")
            if keys and isinstance(header[keys[j % len(keys)]], dict):
                header[keys[j % len(keys)]][field] = value

        edit_header(files, i, edit)
    elif kind == "metadata":
        edit_header(files, args[0], lambda header: header.__setitem__("__metadata__", args[1]))
    elif kind == "swap":  # two entries trade dtype/shape/offsets: often still a valid file
        i, j, k = args

        def edit(header):
            keys = sorted(k for k in header if k != "__metadata__")
            a, b = keys[j % len(keys)], keys[k % len(keys)]
            header[a], header[b] = header[b], header[a]

        edit_header(files, i, edit)
    elif kind in ("header_length", "truncate", "append", "flip"):
        name = names[args[0] % len(names)]
        blob = files[name]
        if kind == "header_length":
            files[name] = (args[1] % 2**64).to_bytes(8, "little") + blob[8:]
        elif kind == "truncate":
            files[name] = blob[: int(len(blob) * args[1])]
        elif kind == "append":
            files[name] = blob + args[1]
        elif blob:
            at = min(int(len(blob) * args[1]), len(blob) - 1)
            files[name] = blob[:at] + bytes([blob[at] ^ (1 << args[2])]) + blob[at + 1 :]
    elif kind == "index":
        op, value = args
        try:
            index = json.loads(files[INDEX])
            weight_map = index["weight_map"]
            key = sorted(weight_map)[hash(repr(value)) % len(weight_map)]
        except (KeyError, ValueError, TypeError, ZeroDivisionError, AttributeError):
            return
        if not isinstance(weight_map, dict):
            return  # an earlier mutation replaced it
        if op == "key":
            weight_map[str(value)] = weight_map.pop(key)
        elif op == "value":
            weight_map[key] = value
        elif op == "weight_map":
            index["weight_map"] = value
        elif op == "drop":
            del weight_map[key]
        elif op == "add":
            weight_map["extra.weight"] = value
        else:
            files[INDEX] = repr(value).encode()
            return
        with contextlib.suppress(TypeError, ValueError):  # a value JSON cannot hold: keep the old index
            files[INDEX] = json.dumps(index).encode()
    elif kind == "remove":
        files.pop(sorted(files)[args[0] % len(files)])


def write_base(base: Path, files: dict[str, bytes]) -> None:
    for p in base.iterdir():
        p.unlink()
    for name, blob in files.items():
        (base / name).write_bytes(blob)


def check(code: int, err: str, what: str) -> str:
    lines = err.strip().splitlines()
    lines = [line for line in lines if not line.startswith("adapterlab: warning: ")]
    if code == 0:
        return f"{what}:ok"
    assert code == 1 and len(lines) == 1 and lines[0].startswith("adapterlab: error: "), (code, err)
    return f"{what}:error"


def run(args: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with alarm():
        code = main([str(a) for a in args])  # any exception but exit codes fails the test
    return code, capsys.readouterr().err


def reference_accepts(base: Path) -> None:
    """The oracle for a base that merge or validate accepted: the safetensors library itself reads
    every shard the index names (exact coverage, no overlap, string metadata), and the index puts
    every tensor in the shard that holds it."""
    import json

    from safetensors import safe_open

    weight_map = json.loads((base / INDEX).read_text())["weight_map"]
    found = {}
    for name in sorted(set(weight_map.values())):
        with safe_open(base / name, "pt") as f:
            found.update(dict.fromkeys(f.keys(), name))  # noqa: SIM118
            assert all(isinstance(v, str) for v in (f.metadata() or {}).values())
    assert found == weight_map, "the index does not match its shards"


def merged_is_whole(out: Path, base: Path) -> None:
    """A successful merge wrote a checkpoint our strict reader accepts, with the base's tensors."""
    from adapterlab.files.checkpoint_dir import open_checkpoint

    assert set(open_checkpoint(out).tensors) == set(open_checkpoint(base).tensors)
    assert all(SECRET not in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())


SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.mark.parametrize("command", ["merge", "validate"])
def test_mutated_bases_end_in_success_or_one_line_error(seed, tmp_path, command, capsys):
    work = fresh(seed, tmp_path / "in")
    original = files_of(work / "base")

    @SETTINGS
    @given(st.lists(mutations, min_size=1, max_size=3))
    def one(ms):
        files = dict(original)
        for m in ms:
            mutate(files, m)
        write_base(work / "base", files)
        before = snapshot(work)
        out = tmp_path / "merged"
        if out.exists():
            shutil.rmtree(out)
        if command == "merge":
            args = ["merge", "--base", work / "base", "--adapter", work / "lora_a", "--out", out]
        else:
            args = ["validate", work / "lora_a", "--base", work / "base"]
        code, err = run(args, capsys)
        OUTCOMES[check(code, err, command)] += 1
        assert snapshot(work) == before, "an input changed"
        assert sorted(p.name for p in tmp_path.iterdir()) == (
            ["in", "merged"] if code == 0 and command == "merge" else ["in"]
        )
        if code == 0:
            reference_accepts(work / "base")
        if code == 0 and command == "merge":
            merged_is_whole(out, work / "base")

    one()


# -- special files and symlinks in the input directories -------------------------------------------
ENTRY_KINDS = [*SPECIAL_KINDS, "dangling", "outside", "other input", "sibling", "empty"]
entries = st.tuples(
    st.sampled_from(["lora_a", "base"]),
    st.sampled_from(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "config.json",
            INDEX,
            "SHARD",
            "tokenizer.json",
            "README.md",
        ]
    ),
    st.sampled_from(ENTRY_KINDS),
)
COMMANDS = ["inspect", "validate", "merge", "export_peft", "export_dense", "combine", "load"]


def place(work: Path, directory: str, name: str, kind: str) -> None:
    root = work / directory
    if name == "SHARD":
        shards = sorted(root.glob("model-*.safetensors"))
        name = shards[0].name if shards else "model-00001-of-00004.safetensors"
    path = root / name
    if kind in SPECIAL_KINDS:
        make_special(path, kind)
        return
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "dangling":
        path.symlink_to(work / "nowhere")
    elif kind == "outside":
        path.symlink_to(work.parent.parent / "outside.txt")
    elif kind == "other input":
        other = work / ("base" if directory == "lora_a" else "lora_a")
        path.symlink_to(next((p for p in sorted(other.iterdir()) if p.is_file()), other))
    elif kind == "sibling":
        path.symlink_to(next((p.name for p in sorted(root.iterdir()) if p.is_file() and p != path), "."))


def command_args(work: Path, out: Path, command: str) -> list | None:
    a, b = work / "lora_a", work / "base"
    return {
        "inspect": ["inspect", a],
        "validate": ["validate", a, "--base", b],
        "merge": ["merge", "--base", b, "--adapter", a, "--out", out],
        "export_peft": ["export", a, "--format", "peft", "--out", out],
        "export_dense": ["export", a, "--format", "dense", "--out", out],
        "combine": ["combine", work / "combine.yaml"],
    }.get(command)


def test_special_files_and_symlinks_in_inputs_end_in_success_or_one_line_error(seed, tmp_path, capsys):
    work = tmp_path / "in"
    model = tiny_llama(layers=1)

    @SETTINGS
    @given(st.lists(entries, min_size=1, max_size=3), st.sampled_from(COMMANDS))
    def one(placed, command):
        fresh(seed, work)
        (work / "combine.yaml").write_text(f"adapters: {{a: lora_a, b: lora_b}}\nout: {tmp_path / 'out'}\n")
        for entry in placed:
            place(work, *entry)
        before = snapshot(work)
        out = tmp_path / "out"
        if command == "load":
            with alarm():
                try:
                    al.load(model, work / "lora_a", name="fuzz")
                    al.delete(model, "fuzz")
                    OUTCOMES["load:ok"] += 1
                except al.AdapterlabError as e:
                    assert "\n" not in str(e)
                    OUTCOMES["load:error"] += 1
            assert "fuzz" not in al.adapters(model)
        else:
            code, err = run(command_args(work, out, command), capsys)
            OUTCOMES[check(code, err, command)] += 1
            if code == 0 and os.path.isdir(out):
                files = [p for p in out.rglob("*") if p.is_file()]
                assert all(SECRET not in p.read_text(errors="ignore") for p in files), (
                    "outside content copied"
                )
                assert not any(p.is_symlink() for p in out.iterdir()), "a link was copied into OUT"
        assert snapshot(work) == before, "an input changed"
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    one()
