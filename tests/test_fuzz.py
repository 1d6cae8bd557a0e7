"""Untrusted adapter directories: mutated copies of valid ones (made by al.save for LoRA and a
sparse SFT, and by peft for a LoRA) fed to `al.load` (into a tiny Llama), `inspect` and `validate` end in
success or an `AdapterlabError`, never another exception, a hang, a crash, or unpickling.

CI runs FUZZ_EXAMPLES examples per seed directory (default 100, three seeds). For a long run:
    ADAPTERLAB_FUZZ_EXAMPLES=3000 python -m pytest -q -s tests/test_fuzz.py
(-s prints the count of examples run and how they ended).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterlab as al
from adapterlab.io import CONFIG_FILE, WEIGHTS_FILE

FUZZ_EXAMPLES = int(os.environ.get("ADAPTERLAB_FUZZ_EXAMPLES", "100"))
SECONDS_PER_EXAMPLE = 20  # a load of a tiny adapter takes milliseconds; past this it is a hang
OUTCOMES: collections.Counter = collections.Counter()


# -- seed directories --------------------------------------------------------------------------------
def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def lora_seed(tmp: Path) -> dict[str, bytes]:
    model = al.inject(tiny_llama(), "lora", r=2, targets=["q_proj", "v_proj"])
    randomize_lora(model)
    return files_of(al.save(model, tmp / "lora"))


def sft_seed(tmp: Path) -> dict[str, bytes]:
    model = al.inject(tiny_llama(), "sft", targets=["o_proj"])
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, al.SparseDelta):
            where = torch.randperm(module.numel, generator=gen)[:20].sort().values
            module.set_support(where, torch.randn(20, generator=gen))
    return files_of(al.save(model, tmp / "sft"))


def peft_seed(tmp: Path) -> dict[str, bytes]:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    randomize_lora(model)
    model.save_pretrained(tmp / "peft")
    return files_of(tmp / "peft")


SEEDS = {"lora": lora_seed, "sft": sft_seed, "peft": peft_seed}


@pytest.fixture(scope="module")
def model():
    """One model for every example: a successful load is deleted again, a failed one must leave
    nothing behind; at the end its state must equal a fresh model's."""
    model = tiny_llama()
    yield model
    fresh = tiny_llama().state_dict()
    state = model.state_dict()
    assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in fresh)
    for call in CALLS:
        counts = {k.split(":")[1]: n for k, n in sorted(OUTCOMES.items()) if k.startswith(f"{call}:")}
        print(
            f"\nfuzz {call}: {sum(counts.values())} directories (up to {FUZZ_EXAMPLES} mutated per seed): {counts}"
        )


# -- mutations -----------------------------------------------------------------------------------------
def split(blob: bytes) -> tuple[dict, bytes] | None:
    """A safetensors file's header and data section, or None if it no longer parses."""
    n = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 or 8 + n > len(blob):
        return None
    try:
        header = json.loads(blob[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, blob[8 + n :]) if isinstance(header, dict) else None


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def edit_header(files: dict, edit) -> None:
    parts = split(files.get(WEIGHTS_FILE) or b"")
    if parts is not None:
        header, data = parts
        edit(header)
        files[WEIGHTS_FILE] = join(header, data)


def edit_json(files: dict, where: str, edit) -> None:
    """Apply `edit(doc) -> doc` to adapter_config.json or to the header's adapterlab block."""
    if where == "config":
        try:
            doc = json.loads(files.get(CONFIG_FILE) or b"")
        except (ValueError, RecursionError):
            return
        files[CONFIG_FILE] = json.dumps(edit(doc)).encode()
        return

    def on_header(header: dict) -> None:
        meta = header.get("__metadata__")
        if isinstance(meta, dict) and isinstance(meta.get("adapterlab"), str):
            try:
                doc = json.loads(meta["adapterlab"])
            except (ValueError, RecursionError):
                return
            meta["adapterlab"] = json.dumps(edit(doc))

    edit_header(files, on_header)


def replace_at(doc, path: list[int], op: str, value):
    """Walk into `doc` choosing children by `path` (indices mod the container size), then set,
    delete, or add an unknown key beside the child reached."""
    parent, key, node = None, None, doc
    for i in path:
        if not isinstance(node, (dict, list)) or not node:
            break
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, keys[i % len(keys)]
        node = node[key]
    if parent is None:
        return value
    if op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[f"unknown_{len(parent)}"] = value
    else:
        parent[key] = value
    return doc


CONFIG_FIELDS = [
    "r",
    "alpha",
    "dropout",
    "rslora",
    "conv_mode",
    "targets",
    "exclude",
    "layers",
    "density",
    "count",
    "method",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "peft_type",
    "bias",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
]
BLOCK_FIELDS = ["format_version", "library_version", "method", "config", "fingerprint"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        [-1, 0, 1, 2**31, 2**62, 10**9, float("nan"), float("inf"), "lora", "sft", "LORA", "all"]
    ),
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
files_ = st.sampled_from([WEIGHTS_FILE, CONFIG_FILE])
dims = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**40, 2**62, 2**64, 10**30]))
ENTRY_VALUES = {
    "dtype": st.one_of(
        st.sampled_from(
            [
                "F32",
                "F16",
                "BF16",
                "F64",
                "I64",
                "I32",
                "I16",
                "I8",
                "U8",
                "BOOL",
                "U16",
                "U32",
                "U64",
                "F8_E4M3",
                "F8_E5M2",
                "C64",
                "",
                "f32",
            ]
        ),
        json_values,
    ),
    "shape": st.one_of(st.lists(dims, max_size=4), json_values),
    "data_offsets": st.one_of(st.lists(st.one_of(dims, st.integers(0, 3000)), max_size=3), json_values),
}
GARBAGE = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b"1",
            b'"x"',
            b"NaN",
            b'{"adapterlab": 3}',
            b'{"adapterlab": null}',
            b'{"peft_type": "LORA", "r": -1}',
            b'{"peft_type": "LORA"}',
            b'{"peft_type": "IA3"}',
            b"DEEP",
            b'{"r": ' + b"9" * 5000 + b"}",
            b"\xff\xfe{}",
        ]
    ),
)
DEEP = b"[" * 100_000 + b"]" * 100_000  # nesting past Python's recursion limit ("DEEP" in examples)
# a pickle that runs `touch MARKER` when unpickled
PICKLE = b"cos\nsystem\n(S'touch %s'\ntR."

mutations = st.one_of(
    st.tuples(st.just("truncate"), files_, st.floats(0, 1)),
    st.tuples(
        st.just("flip"),
        files_,
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8),
        st.booleans(),
    ),
    st.tuples(
        st.just("header_length"),
        st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 7, 2**63, 2**64 - 1, 10**8])),
    ),
    st.sampled_from(sorted(ENTRY_VALUES)).flatmap(
        lambda field: st.tuples(st.just("entry"), st.integers(0, 20), st.just(field), ENTRY_VALUES[field])
    ),
    st.tuples(st.just("drop_entry"), st.integers(0, 20)),
    st.tuples(
        st.just("rename_entry"),
        st.integers(0, 20),
        st.one_of(
            st.text(max_size=12),
            st.sampled_from(
                [
                    "base_model.model.",
                    "base_model.model.lm_head.lora_A.weight",
                    "base_model.model.model.indices",
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
                ]
            ),
        ),
    ),
    st.tuples(
        st.just("json"),
        st.sampled_from(["config", "block"]),
        st.lists(st.integers(0, 20), min_size=1, max_size=4),
        st.sampled_from(["set", "delete", "add"]),
        json_values,
    ),
    st.tuples(
        st.just("field"),
        st.sampled_from(["config", "block"]),
        st.sampled_from(CONFIG_FIELDS + BLOCK_FIELDS),
        json_values,
    ),
    st.tuples(st.just("raw"), files_, GARBAGE),
    st.tuples(st.just("raw_block"), GARBAGE),
    st.tuples(st.just("remove"), files_),
    st.tuples(st.just("pickle"), st.booleans()),
    st.tuples(st.just("directory"), files_),
)


def set_field(doc, field: str, value):
    if not isinstance(doc, dict):
        return doc
    target = doc["config"] if field in CONFIG_FIELDS and isinstance(doc.get("config"), dict) else doc
    target[field] = value
    return doc


def mutate(files: dict, m: tuple, marker: Path) -> None:
    """Apply one mutation to `files` ({name: bytes | None}; None: a directory of that name)."""
    kind = m[0]
    if kind == "truncate" and files.get(m[1]):
        files[m[1]] = files[m[1]][: int(m[2] * len(files[m[1]]))]
    elif kind == "flip" and files.get(m[1]):
        blob = bytearray(files[m[1]])
        span = (
            min(len(blob), 8 + int.from_bytes(blob[:8], "little"))
            if m[3] and m[1] == WEIGHTS_FILE
            else len(blob)
        )
        for where, bit in m[2]:
            blob[min(int(where * span), len(blob) - 1)] ^= 1 << bit
        files[m[1]] = bytes(blob)
    elif kind == "header_length" and files.get(WEIGHTS_FILE):
        files[WEIGHTS_FILE] = m[1].to_bytes(8, "little") + files[WEIGHTS_FILE][8:]
    elif kind == "entry":

        def edit(header):
            names = tensor_names(header)
            if names and isinstance(header[names[m[1] % len(names)]], dict):
                header[names[m[1] % len(names)]][m[2]] = m[3]

        edit_header(files, edit)
    elif kind == "drop_entry":
        edit_header(
            files, lambda h: h.pop(tensor_names(h)[m[1] % len(tensor_names(h))]) if tensor_names(h) else None
        )
    elif kind == "rename_entry":

        def edit(header):
            names = tensor_names(header)
            if names:
                header[m[2]] = header.pop(names[m[1] % len(names)])

        edit_header(files, edit)
    elif kind == "json":
        edit_json(files, m[1], lambda doc: replace_at(doc, m[2], m[3], m[4]))
    elif kind == "field":
        edit_json(files, m[1], lambda doc: set_field(doc, m[2], m[3]))
    elif kind == "raw":
        files[m[1]] = DEEP if m[2] == b"DEEP" else m[2]
    elif kind == "raw_block":
        text = (DEEP if m[1] == b"DEEP" else m[1]).decode("utf-8", "replace")
        edit_header(
            files,
            lambda h: (
                h.setdefault("__metadata__", {}).update(adapterlab=text)
                if isinstance(h.get("__metadata__", {}), dict)
                else None
            ),
        )
    elif kind == "remove":
        files.pop(m[1], None)
    elif kind == "pickle":
        files["adapter_model.bin"] = PICKLE % str(marker).encode()
        if m[1]:
            files.pop(WEIGHTS_FILE, None)
    elif kind == "directory":
        files[m[1]] = None


def write(directory: Path, files: dict) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for name, blob in files.items():
        if blob is None:
            (directory / name).mkdir()
        else:
            (directory / name).write_bytes(blob)


# -- the properties ------------------------------------------------------------------------------------
class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a call took over {SECONDS_PER_EXAMPLE} s")


def run_inspect(directory: Path) -> None:
    """`adapterlab inspect DIR`, in-process: returns, or raises an AdapterlabError."""
    from adapterlab import cli

    if hasattr(cli, "inspect_adapter"):
        cli.inspect_adapter(str(directory))
        return
    from click.testing import CliRunner  # the click CLI: exit code 1 is a reported AdapterlabError

    result = CliRunner().invoke(cli.main, ["inspect", "--json", str(directory)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception


def outcome(call) -> str:
    """'ok' or the AdapterlabError's class name; anything else propagates and fails the test."""
    try:
        call()
    except al.AdapterlabError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return type(e).__name__
    return "ok"


def load_once(model, directory: Path) -> None:
    """`al.load` into the shared model; a success is deleted again, a failure must add nothing."""
    try:
        al.load(model, directory, name="fuzz")
    finally:
        assert set(al.adapters(model)) <= {"fuzz"}
    al.delete(model, "fuzz")


_BASE: list[Path] = []


def run_validate(directory: Path) -> None:
    """`adapterlab validate DIR --base BASE`, in-process, against a saved tiny Llama checkpoint:
    returns its checks (failed checks are a normal outcome), or raises an AdapterlabError."""
    from adapterlab.validate import validate

    if not _BASE:
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="fuzz-base-"))
        tiny_llama().save_pretrained(base)
        _BASE.append(base)
    validate(directory, _BASE[0])


CALLS = {
    "load": load_once,
    "inspect": lambda model, directory: run_inspect(directory),
    "validate": lambda model, directory: run_validate(directory),
}


def check_one(call: str, model, files: dict, directory: Path, marker: Path) -> str:
    """Write `files` to `directory`, run `call` on it; return the outcome."""
    write(directory, files)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_EXAMPLE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys warn; that is allowed
            result = outcome(lambda: CALLS[call](model, directory))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert "fuzz" not in al.adapters(model)
    assert not marker.exists(), "a pickle was unpickled"
    OUTCOMES[f"{call}:{result}"] += 1
    return result


@pytest.mark.parametrize("seed", sorted(SEEDS))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_mutated_directories_end_in_success_or_adapterlab_error(model, call, seed, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"fuzz-{seed}")
    original = SEEDS[seed](work)
    marker = work / "PICKLE-WAS-LOADED"
    assert check_one(call, model, dict(original), work / "adapter", marker) == "ok"  # the seed itself is fine

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(st.lists(mutations, min_size=1, max_size=3))
    def run(ms):
        files = dict(original)
        for m in ms:
            mutate(files, m, marker)
        check_one(call, model, files, work / "adapter", marker)

    run()


def test_huge_rank_in_a_small_file_is_refused_before_allocating(tmp_path):
    """r = 10**9 in the config of a 1 kB file: the shapes are compared on the meta device first."""
    files = lora_seed(tmp_path)
    mutate(files, ("field", "block", "r", 10**9), tmp_path / "m")
    write(tmp_path / "big", files)
    with pytest.raises(al.AdapterFileError, match=r"r=1000000000"):
        al.load(tiny_llama(), tmp_path / "big")


def test_declared_sizes_are_checked_against_the_file(tmp_path):
    files = lora_seed(tmp_path)
    header, data = split(files[WEIGHTS_FILE])
    name = tensor_names(header)[0]
    header[name]["shape"], header[name]["data_offsets"] = (
        [2**20, 2**10],
        [0, 4 * 2**30],
    )  # 4 GiB in a 1 kB file
    write(tmp_path / "huge", {**files, WEIGHTS_FILE: join(header, data)})
    with pytest.raises(
        al.AdapterFileError, match=r"declares F32 \[1048576, 1024\] at bytes \[0, 4294967296\)"
    ):
        al.load(tiny_llama(), tmp_path / "huge")
    header[name]["shape"], header[name]["data_offsets"] = [0, 2**62, 2**62], [0, 0]  # empty, but absurd
    write(tmp_path / "absurd", {**files, WEIGHTS_FILE: join(header, data)})
    with pytest.raises(al.AdapterFileError, match=r"declares shape \[0, 4611686018427387904, .*too large"):
        al.load(tiny_llama(), tmp_path / "absurd")
    write(
        tmp_path / "length", {**files, WEIGHTS_FILE: (2**63).to_bytes(8, "little") + files[WEIGHTS_FILE][8:]}
    )
    with pytest.raises(al.AdapterFileError, match=r"header length field says 9223372036854775808 bytes"):
        al.load(tiny_llama(), tmp_path / "length")


def test_unknown_keys_are_warned_by_name_and_ignored(tmp_path):
    files = sft_seed(tmp_path)
    mutate(files, ("field", "block", "future_option", 1), tmp_path / "m")
    mutate(files, ("field", "block", "fingerprint_v2", {}), tmp_path / "m")
    write(tmp_path / "ad", files)
    with pytest.warns(UserWarning) as caught:
        model = al.load(tiny_llama(), tmp_path / "ad")
    messages = " ".join(str(w.message) for w in caught)
    assert "future_option" in messages and "fingerprint_v2" in messages
    assert al.adapters(model)["default"].method == "sft"


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("r", -2, r"r=-2"),
        ("r", "8", r"r='8'"),
        ("alpha", float("nan"), r"alpha=nan"),
        ("alpha", float("inf"), r"alpha=inf"),
        ("dropout", None, r"dropout=None"),
        ("targets", 5, r"targets=5"),
        ("layers", [-1], r"layers=\[-1\]"),
        ("config", [1, 2], r"config \[1, 2\]"),
        (
            "fingerprint",
            {"modules": {"x": {"type": "Linear", "shape": "big"}}},
            r"fingerprint .* is malformed",
        ),
        ("format_version", "1", r"integer format_version"),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value, match):
    files = lora_seed(tmp_path)
    mutate(files, ("field", "block", field, value), tmp_path / "m")
    write(tmp_path / "ad", files)
    with pytest.raises(al.AdapterFileError, match=match) as info:
        al.load(tiny_llama(), tmp_path / "ad")
    assert "\n" not in str(info.value)


def test_a_pickle_beside_or_instead_of_the_weights_is_never_loaded(tmp_path):
    files = lora_seed(tmp_path)
    marker = tmp_path / "PWNED"
    write(tmp_path / "beside", {**files, "adapter_model.bin": PICKLE % str(marker).encode()})
    al.load(tiny_llama(), tmp_path / "beside")  # the safetensors file is used, the pickle ignored
    write(
        tmp_path / "instead",
        {CONFIG_FILE: files[CONFIG_FILE], "adapter_model.bin": PICKLE % str(marker).encode()},
    )
    with pytest.raises(al.AdapterFileError, match="never unpickles"):
        al.load(tiny_llama(), tmp_path / "instead")
    assert not marker.exists()
