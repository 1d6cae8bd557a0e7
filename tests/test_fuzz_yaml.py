"""Untrusted combine configs: hypothesis-generated and mutated YAML files (aliases and alias bombs,
deep nesting, wrong types, huge numbers, odd strings, odd paths) through `adapterlab combine`
(in-process `main()`). Every outcome is success or one line `adapterlab: error: …` (exit 1): no
traceback, no last-resort "unexpected" line, no hang (an alarm per example), no file touched
outside the config's OUT (the sandbox tree is compared before and after every example).

CI runs FUZZ_EXAMPLES examples per strategy (default 100, three strategies). For a long run:
    ADAPTERLAB_FUZZ_EXAMPLES=1000 python -m pytest -q -s tests/test_fuzz_yaml.py
(-s prints the count of examples run and how they ended).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import randomize_lora, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterlab as al
from adapterlab.cli import main

FUZZ_EXAMPLES = int(os.environ.get("ADAPTERLAB_FUZZ_EXAMPLES", "100"))
SECONDS_PER_EXAMPLE = 60  # a combine of two tiny adapters takes ~0.1 s; past this it is a hang
MAX_ERROR_CHARS = 2000  # errors quote short excerpts: an alias bomb must not make a 58 MB line
OUTCOMES: collections.Counter = collections.Counter()
LAST_ERROR: list[str] = [""]
FIELDS = ("adapters", "weights", "how", "kind", "density", "p", "seed", "rank", "trim_scope", "out", "base")


# -- the sandbox ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """root/{a, b, sft} adapters and root/base (a tiny Llama checkpoint); the config is root/config.yaml."""
    root = tmp_path_factory.mktemp("fuzz-yaml")
    for name, seed in (("a", 1), ("b", 2)):
        model = al.inject(tiny_llama(), "lora", r=2, targets=["q_proj", "v_proj"])
        randomize_lora(model, seed=seed)
        al.save(model, root / name)
    sft = al.inject(tiny_llama(), "sft", targets=["q_proj"])
    al.save(sft, root / "sft")
    tiny_llama().save_pretrained(root / "base")
    (root / "cfg").mkdir()  # a directory that is not an adapter
    yield root
    for strategy in STRATEGIES:
        counts = {k.split(":")[1]: n for k, n in sorted(OUTCOMES.items()) if k.startswith(f"{strategy}:")}
        print(f"\nfuzz-yaml {strategy}: {sum(counts.values())} configs (up to {FUZZ_EXAMPLES}): {counts}")


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root`: (size, mtime_ns)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            found[str(path)] = (info.st_size if name in filenames else 0, info.st_mtime_ns)
    return found


# -- generated configs -----------------------------------------------------------------------------------
ODD_STRINGS = st.sampled_from(
    ["", " ", "a", "\x1b[2J\x1b]0;t\x07", "\u202eevil", "x" * 5000, "a\x00b", "../a", "a/../b", ".", "..",
     "~", "$HOME", "*", "a[x]", "\\", "null", "~/a", "é", "\ud7ff", "line\nbreak"]
)  # fmt: skip
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63, 2**64, 10**9, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, ODD_STRINGS, st.text(max_size=20))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SCALARS, inner, max_size=3),
                    max_leaves=8)  # fmt: skip
PATHS = st.sampled_from(
    ["a", "b", "sft", "../a", "./b", "base", "nowhere", "cfg", "a/adapter_model.safetensors"]
)
OUTS = st.sampled_from(["out", "out/sub", "./out2", "../out3", "out dir", "o[x]", "out\x1b"])
VALUES = {
    "adapters": st.one_of(st.dictionaries(st.sampled_from(["a", "b", "s", "A-1", "bad name", ""]), PATHS,
                                          min_size=1, max_size=3), JUNK),
    "weights": st.one_of(st.none(), st.dictionaries(st.sampled_from(["a", "b", "s"]), NUMBERS, max_size=3),
                         st.lists(NUMBERS, max_size=3), JUNK),
    "how": st.one_of(st.sampled_from(["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd",
                                      "LINEAR", "avg"]), JUNK),
    "kind": st.one_of(st.sampled_from(["lora", "dense", "sparse", "LoRA"]), JUNK),
    "density": st.one_of(st.floats(min_value=-1, max_value=2), NUMBERS, JUNK),
    "p": st.one_of(st.floats(min_value=-1, max_value=2), NUMBERS, JUNK),
    "seed": st.one_of(NUMBERS, JUNK),
    "rank": st.one_of(st.none(), st.integers(min_value=-2, max_value=80), NUMBERS, JUNK),
    "trim_scope": st.one_of(st.sampled_from(["tensor", "global"]), JUNK),
    "out": st.one_of(OUTS, JUNK),
    "base": st.one_of(st.none(), PATHS, JUNK),
}  # fmt: skip


@st.composite
def structured(draw) -> str:
    """A mapping of (mostly) known keys to right- or wrong-typed values, dumped as YAML."""
    keys = draw(st.lists(st.sampled_from([*FIELDS, "wieghts", "extra"]), max_size=8, unique=True))
    doc = {"adapters": {"a": "a", "b": "b"}, "out": "out"} if draw(st.booleans()) else {}
    for key in keys:
        doc[key] = draw(VALUES.get(key, JUNK))
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))


VALID = "adapters: {a: a, b: b}\nweights: {a: 1.0, b: 0.5}\nhow: ties\nkind: lora\nrank: 2\nout: out\n"


def bomb(levels: int, width: int) -> str:
    lines = ['l0: &l0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\nadapters: *l{levels - 1}\nout: out\n"


MUTATIONS = st.one_of(
    st.tuples(st.just("bomb"), st.integers(2, 12), st.integers(2, 12)),
    st.tuples(st.just("deep"), st.integers(10, 20_000), st.sampled_from(["[", "{a: ", "- "])),
    st.tuples(st.just("scalar_alias"), st.integers(1, 300)),
    st.tuples(st.just("merge_key"), st.just(0)),
    st.tuples(st.just("tag"), st.sampled_from(["!!python/object/apply:os.system ['true']", "!!binary AAA=",
                                               "!!set {a, b}", "!!timestamp 2001-13-45", "!!int 0x", "!!float x",
                                               "!!str", "!custom 1", "!!omap [a: 1]", "2001-12-14",
                                               "!!timestamp", "!!int", "!!bool maybe", "!!null x"])),
    st.tuples(st.just("huge_int"), st.integers(10, 20_000)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("replace_value"), st.sampled_from(FIELDS), JUNK),
    st.tuples(st.just("long_line"), st.integers(1, 2_000_000)),
)  # fmt: skip


def mutate(text: str, m: tuple) -> bytes:
    kind = m[0]
    if kind == "bomb":
        return bomb(m[1], m[2]).encode()
    if kind == "deep":
        opening = m[2]
        closing = {"[": "]", "{a: ": "}", "- ": ""}[opening]
        body = (
            (opening * m[1] + "1" + closing * m[1])
            if closing
            else "".join("  " * i + "- \n" for i in range(min(m[1], 1500)))
        )
        return f"adapters: {{a: a}}\nout: out\nweights: {body}\n".encode()
    if kind == "scalar_alias":
        return (f"x: &x a\nadapters: {{{', '.join(f'n{i}: *x' for i in range(m[1]))}}}\nout: out\n").encode()
    if kind == "merge_key":
        return b"defaults: &d {how: ties, kind: lora}\n<<: *d\nadapters: {a: a}\nout: out\n"
    if kind == "tag":
        return f"adapters: {{a: a}}\nout: out\nrank: {m[1]}\n".encode()
    if kind == "huge_int":
        return f"adapters: {{a: a}}\nout: out\nseed: {'9' * m[1]}\n".encode()
    if kind == "flip":
        data = bytearray(text.encode())
        at = m[1] % (len(data) + 1)
        data[at : at + len(m[2])] = m[2]
        return bytes(data)
    if kind == "truncate":
        return text.encode()[: m[1] % (len(text) + 1)]
    if kind == "replace_value":
        try:
            doc = yaml.safe_load(text)
        except Exception:  # PyYAML on a mutated text: YAMLError, ValueError, AttributeError, …
            doc = None
        doc = doc if isinstance(doc, dict) else yaml.safe_load(VALID)
        doc[m[1]] = m[2]
        return yaml.safe_dump(doc).encode()
    return VALID.encode() + b"# " + b"x" * m[1] + b"\n"


STRATEGIES = {
    "structured": structured().map(str.encode),
    "mutated": st.lists(MUTATIONS, min_size=1, max_size=2).map(
        lambda ms: mutate(VALID, ms[0]) if len(ms) == 1 else mutate(mutate(VALID, ms[0]).decode("utf-8", "replace"), ms[1])
    ),
    "valid": st.builds(
        lambda how, kind, rank, w: yaml.safe_dump(
            {"adapters": {"a": "a", "b": "b"}, "weights": [1.0, w], "how": how, "kind": kind, "rank": rank, "out": "out"}
        ).encode(),
        st.sampled_from(["linear", "ties", "dare_linear", "magnitude_prune", "cat", "svd"]),
        st.sampled_from(["lora", "dense", "sparse"]),
        st.one_of(st.none(), st.integers(1, 40)),
        st.floats(-2, 2),
    ),
}  # fmt: skip


# -- the property ----------------------------------------------------------------------------------------
class Hang(BaseException):  # not an Exception: the CLI's last-resort handler must not report it
    pass


def _alarm(signum, frame):
    raise Hang(f"a combine took over {SECONDS_PER_EXAMPLE} s")


def check_one(root: Path, data: bytes, capsys) -> str:
    """Run `adapterlab combine` on `data`; return 'ok' or 'error'. Anything else fails the test."""
    config = root / "config.yaml"
    config.write_bytes(data)
    before = tree(root)
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_EXAMPLE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(["combine", str(config)])
            except SystemExit as e:  # usage errors (exit 2) cannot come from a file
                code = e.code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    if code == 0:
        result = "ok"
        assert out.startswith("combined "), (out, err)
    else:
        assert code == 1 and len(lines) == 1 and lines[0].startswith("adapterlab: error: "), (
            code,
            err[:2000],
        )
        assert "unexpected" not in lines[0] and "Traceback" not in err, err[:2000]
        assert len(err) <= MAX_ERROR_CHARS and "\x1b" not in err, err[:300]
        result = "error"
        LAST_ERROR[:] = lines
    after = tree(root)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    written = None
    if result == "ok":
        written = (root / yaml.safe_load(config.read_bytes())["out"]).resolve()
        assert (written / "combine.yaml").is_file()
    # OUT, what is under it, and OUT's parents that did not exist (created for it) may change
    made_for_out = {str(a) for a in written.parents} - set(before) if written is not None else set()
    outside = [
        p
        for p in changed
        if written is None or not (p == str(written) or p.startswith(f"{written}/") or p in made_for_out)
    ]
    outside = [p for p in outside if p not in (str(config), str(root))]
    assert not outside, f"touched outside OUT: {outside[:5]}"
    for path in changed:  # undo a success: the next example starts from the same tree
        if path not in before and Path(path).exists() and path.startswith(str(root)):
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    return result


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_generated_combine_configs_end_in_success_or_one_line_error(sandbox, strategy, capsys):
    if strategy == "valid":
        assert check_one(sandbox, VALID.encode(), capsys) == "ok"  # the seed config itself works

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
    @given(STRATEGIES[strategy])
    def run(data):
        OUTCOMES[f"{strategy}:{check_one(sandbox, data, capsys)}"] += 1

    run()


@pytest.mark.parametrize(
    "data, fragment",
    [
        (bomb(9, 9).encode(), "alias"),
        (bomb(10, 10).encode(), "alias"),
        (("weights: " + "[" * 5000 + "]" * 5000 + "\nadapters: {a: a}\nout: out\n").encode(), "nesting"),
        (
            ("weights: " + "{a: " * 5000 + "1" + "}" * 5000 + "\nadapters: {a: a}\nout: out\n").encode(),
            "nesting",
        ),
        (b"adapters: {a: a}\nout: out\n# " + b"x" * (2**20 + 10), "bytes"),
        (b"adapters: {a: a}\nout: out\nseed: " + b"9" * 5000 + b"\n", "YAML"),
        (b'adapters: {a: a}\nout: out\nhow: "\\x1b[2J\\u202e' + b"y" * 100_000 + b'"\n', "how"),
        (b"adapters: {a: a}\nout: out\nrank: !!timestamp", "YAML"),
        (b"adapters: {a: a}\nout: out\ndensity: 1" + b"0" * 400 + b"\n", "density"),
    ],
    ids=[
        "bomb-9",
        "bomb-10",
        "deep-flow",
        "deep-mapping",
        "too-big",
        "huge-int",
        "escape-in-value",
        "empty-tag",
        "huge-density",
    ],
)
def test_yaml_bombs_and_deep_nesting_are_short_one_line_errors(sandbox, capsys, data, fragment):
    assert check_one(sandbox, data, capsys) == "error"
    assert fragment in LAST_ERROR[0], LAST_ERROR[0]
