"""The `adapterlab` CLI through its console script, each invocation in its own subprocess.

The inputs (a tiny Llama saved in shards, adapters of several methods, YAML files, broken
directories) are built once; every invocation then runs concurrently (3 at a time: each pays the
~3-5 s torch import) and the tests assert on the results. Unit properties of the streaming
safetensors code, the key resolution and the shard split run in process (hypothesis).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_lora, read_weights, tiny_gpt2, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import adapterlab as al
from adapterlab.checkpoint import _split
from adapterlab.cli import main, parse_size
from adapterlab.files.checkpoint_dir import Checkpoint
from adapterlab.files.safetensors import DTYPES, SafetensorsWriter, TensorInfo, read_header, read_tensor
from adapterlab.locate import locate

CLI = Path(sys.executable).parent / "adapterlab"


def sft_adapter(model: torch.nn.Module, seed: int = 0, k: int = 40) -> None:
    """Give every SFT delta of `model` a random support of k entries with random values."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in al.model.adapter_layers(model):
        delta = layer.deltas["default"]
        idx = torch.randperm(delta.numel, generator=gen)[:k].sort().values
        delta.set_support(idx, torch.randn(k, generator=gen) * 0.1)


def other_llama():
    """A Llama of another shape (intermediate 48): adapters on it do not fit tiny_llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def build_inputs(root: Path) -> dict[str, Path]:
    """Every file the invocations read; returns the paths by name."""
    p = {
        name: root / name
        for name in ("base", "lora_a", "lora_b", "sft", "gpt2_lora", "nan", "other", "pickle")
    }
    tiny_llama().save_pretrained(p["base"], max_shard_size="20KB")  # 7 shards of a ~99 KB model
    for name, seed in (("lora_a", 1), ("lora_b", 2)):
        model = tiny_llama()
        al.inject(model, "lora", r=4, alpha=8)
        randomize_lora(model, seed=seed)
        al.save(model, p[name])
    inner = tiny_llama().model  # an adapter made on LlamaModel: paths lack the checkpoint's "model." prefix
    al.inject(inner, "sft", density=0.01)
    sft_adapter(inner)
    al.save(inner, p["sft"])
    gpt2 = tiny_gpt2()
    al.inject(gpt2, "lora", r=4, alpha=8, targets=["c_attn", "c_fc"])
    randomize_lora(gpt2)
    al.save(gpt2, p["gpt2_lora"])
    nan = tiny_llama()
    al.load(nan, p["lora_a"])
    with torch.no_grad():
        nan.model.layers[1].mlp.up_proj.deltas["default"].lora_B.weight[0, 0] = float("nan")
    al.save(nan, p["nan"])
    other = other_llama()
    al.inject(other, "lora", r=4, alpha=8)
    al.save(other, p["other"])
    p["pickle"].mkdir()
    (p["pickle"] / "adapter_model.bin").write_bytes(b"not read")
    (root / "combine.yaml").write_text(
        "adapters: {a: lora_a, b: lora_b}\nweights: {a: 1.0, b: 0.5}\nhow: ties\n"
        "kind: lora\ndensity: 0.5\nout: combined\n"
    )
    (root / "bad.yaml").write_text("adapters: {a: lora_a\nout: x\n")
    (root / "unknown.yaml").write_text("adapters: {a: lora_a}\nwieghts: {a: 1.0}\nout: x\n")
    return p


def commands(root: Path, p: dict[str, Path]) -> dict[str, list[str]]:
    merge = ["merge", "--base", str(p["base"])]
    return {
        "inspect": ["inspect", str(p["lora_a"]), "--json"],
        "merge": [
            *merge,
            "--adapter",
            str(p["lora_a"]),
            "--out",
            str(root / "m_lora"),
            "--shard-size",
            "30KB",
        ],
        "dry": [*merge, "--adapter", str(p["lora_a"]), "--out", str(root / "m_dry"), "--dry-run"],
        "merge_sft": [*merge, "--adapter", str(p["sft"]), "--out", str(root / "m_sft")],
        "merge_ties": [
            *merge,
            "--adapter",
            str(p["lora_a"]),
            "--adapter",
            str(p["lora_b"]),
            "--weights",
            "1,0.5",
            "--how",
            "ties",
            "--density",
            "0.5",
            "--out",
            str(root / "m_ties"),
        ],
        "export_peft": ["export", str(p["lora_a"]), "--format", "peft", "--out", str(root / "peft")],
        "export_dense": [
            "export",
            str(p["gpt2_lora"]),
            "--format",
            "dense",
            "--out",
            str(root / "dense.safetensors"),
        ],
        "combine": ["combine", str(root / "combine.yaml")],
        "validate": ["validate", str(p["lora_a"]), "--base", str(p["base"])],
        "validate_nan": ["validate", str(p["nan"]), "--base", str(p["base"])],
        "bad_yaml": ["combine", str(root / "bad.yaml")],
        "unknown_key": ["combine", str(root / "unknown.yaml")],
        "pickle": [*merge, "--adapter", str(p["pickle"]), "--out", str(root / "m_pickle")],
        "other_model": [*merge, "--adapter", str(p["other"]), "--out", str(root / "m_other")],
        "bad_how": [*merge, "--adapter", str(p["lora_a"]), "--how", "average", "--out", str(root / "m_bad")],
        "debug": ["--debug", "inspect", str(root / "nowhere")],
    }


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = build_inputs(root)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread, no OpenMP spinning between runs

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(CLI), *args], capture_output=True, text=True, timeout=300, cwd=root, check=False, env=env
        )

    todo = commands(root, paths)
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(todo, pool.map(run, todo.values()), strict=True))
    return SimpleNamespace(root=root, paths=paths, runs=done)


def ok(cli, name: str) -> subprocess.CompletedProcess:
    result = cli.runs[name]
    assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr}"
    return result


def one_line_error(cli, name: str, *fragments: str) -> str:
    result = cli.runs[name]
    assert result.returncode == 1, f"{name}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapterlab: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def state(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval().state_dict()


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


# -- commands -------------------------------------------------------------------------------------
def test_inspect_reports_method_rank_targets_and_fingerprint(cli):
    info = json.loads(ok(cli, "inspect").stdout)
    assert info["method"] == "lora" and info["settings"]["r"] == 4 and info["settings"]["alpha"] == 8
    assert info["targets"] == 14 and info["target_types"] == {"Linear": 14}
    assert info["parameters"] == sum(
        4 * (w.shape[0] + w.shape[1])
        for k, w in tiny_llama().state_dict().items()
        if k.endswith("proj.weight")
    )
    assert info["bytes_on_disk"] > 0 and len(info["fingerprint"]) == 64


def test_merge_streams_shards_and_equals_al_merge_and_peft(cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ok(cli, "merge")
    out = cli.root / "m_lora"
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 30_000 + 1024 for s in shards)  # 30 KB of data plus the header
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert not [p.name for p in cli.root.iterdir() if p.name.startswith(".m_lora")]  # no temp dir left

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = tiny_llama()
    al.load(ours, cli.paths["lora_a"])
    al.merge(ours)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, ours(ids()).logits, rtol=0, atol=1e-5)
    in_memory = al.unload(ours, merge=True).state_dict()
    assert all(torch.equal(merged.state_dict()[k], w) for k, w in in_memory.items())  # al.merge's bits
    peft = PeftModel.from_pretrained(tiny_llama(), cli.paths["lora_a"]).merge_and_unload()
    want, got = peft.state_dict(), merged.state_dict()
    assert set(want) == set(got)
    changed = 0
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(w, tiny_llama().state_dict()[key]) if key.endswith("proj.weight") else 0
    assert changed == 14  # every adapted weight changed


def test_dry_run_lists_modules_per_shard_and_writes_nothing(cli):
    text = ok(cli, "dry").stdout
    assert not (cli.root / "m_dry").exists()
    shard_lines = [line for line in text.splitlines() if line.strip().startswith("model-0")]
    assert len(shard_lines) == 7 and "nothing written" in text
    merged = {
        m
        for line in shard_lines
        if ": " in line.split("merged", 1)[-1]
        for m in line.split("merged: ", 1)[1].split(", ")
    }
    assert len(merged) == 14 and "model.layers.1.mlp.down_proj.weight" in merged


def test_merge_of_a_sparse_adapter_with_a_prefix_difference(cli):
    """An SFT made on LlamaModel (paths `layers.…`) merges into a LlamaForCausalLM checkpoint
    (`model.layers.…`) exactly as al.merge does."""
    ok(cli, "merge_sft")
    ours = tiny_llama()
    al.load(ours.model, cli.paths["sft"])
    al.merge(ours)
    got = state(cli.root / "m_sft")
    base = tiny_llama().state_dict()
    for key, w in al.unload(ours, merge=True).state_dict().items():
        assert torch.equal(got[key], w), key
    assert sum(not torch.equal(got[k], base[k]) for k in base) == 14


def test_merge_of_two_adapters_with_ties_equals_al_combine(cli):
    ok(cli, "merge_ties")
    ours = tiny_llama()
    al.load(ours, cli.paths["lora_a"], name="a")
    al.load(ours, cli.paths["lora_b"], name="b")
    al.combine(ours, {"a": 1.0, "b": 0.5}, how="ties", kind="dense", into="ab", density=0.5)
    al.set_active(ours, "ab")
    want = al.unload(ours, merge=True).state_dict()
    got = state(cli.root / "m_ties")
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=0, atol=1e-6)


def test_export_peft_loads_in_peft_with_identical_outputs(cli):
    from peft import PeftModel

    ok(cli, "export_peft")
    out = cli.root / "peft"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = PeftModel.from_pretrained(tiny_llama(), out).eval()
    ours = al.load(tiny_llama(), cli.paths["lora_a"])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids()).logits, ours(ids()).logits, rtol=1e-5, atol=1e-6)


def test_export_dense_holds_scaled_delta_in_the_base_layout(cli):
    ok(cli, "export_dense")
    model = al.load(tiny_gpt2(), cli.paths["gpt2_lora"])
    deltas = {path: layer.deltas["default"] for path, layer in al.model.adapter_layers(model)}
    with safe_open(cli.root / "dense.safetensors", "pt") as f:
        assert set(f.keys()) == {f"{p}.weight" for p in deltas}
        block = json.loads(f.metadata()["adapterlab"])
        for path, delta in deltas.items():
            dw = f.get_tensor(f"{path}.weight")
            assert dw.shape == model.get_submodule(path).weight.shape  # Conv1D: (in, out)
            assert torch.equal(dw, delta.delta_weight().detach())
    assert block["method"] == "lora" and block["kind"] == "dense_delta"


def test_combine_from_yaml_equals_al_combine_and_writes_the_resolved_config(cli):
    import yaml

    ok(cli, "combine")
    out = cli.root / "combined"
    resolved = yaml.safe_load((out / "combine.yaml").read_text())
    assert list(resolved) == [
        "adapters",
        "weights",
        "how",
        "kind",
        "density",
        "p",
        "seed",
        "rank",
        "trim_scope",
        "out",
        "base",
    ]
    assert resolved["rank"] == 4 and resolved["seed"] == 0 and resolved["base"] is None
    assert resolved["adapters"]["a"] == str(cli.paths["lora_a"]) and resolved["out"] == str(out)
    ours = tiny_llama()
    al.load(ours, cli.paths["lora_a"], name="a")
    al.load(ours, cli.paths["lora_b"], name="b")
    al.combine(ours, {"a": 1.0, "b": 0.5}, how="ties", kind="lora", into="ab", density=0.5)
    al.load(ours, out, name="cli")
    for path, layer in al.model.adapter_layers(ours):
        torch.testing.assert_close(
            layer.deltas["cli"].delta_weight(),
            layer.deltas["ab"].delta_weight(),
            rtol=1e-4,
            atol=1e-6,
            msg=path,
        )
    first = read_weights(out / "adapter_model.safetensors")[0]
    assert main(["combine", str(out / "combine.yaml")]) == 0  # the resolved config is a config: same adapter
    again = read_weights(out / "adapter_model.safetensors")[0]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_validate_passes_every_check(cli):
    lines = ok(cli, "validate").stdout.splitlines()
    assert [line.split()[1] for line in lines] == [
        "format",
        "fingerprint",
        "modules",
        "shapes",
        "dtypes",
        "tensors",
        "finite",
    ]
    assert all(line.split()[0] == "ok" for line in lines)


def test_validate_fails_on_nan(cli):
    one_line_error(cli, "validate_nan", "failed 1 of 7 checks", "finite")
    lines = cli.runs["validate_nan"].stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("FAIL")] == ["finite"]
    assert "model.layers.1.mlp.up_proj.lora_B.weight" in lines[-1]


# -- errors ---------------------------------------------------------------------------------------
def test_errors_are_one_line_with_exit_code_1(cli):
    one_line_error(cli, "bad_yaml", "not valid YAML", "line 2")
    one_line_error(cli, "unknown_key", "unknown key 'wieghts'", "'weights'")
    one_line_error(cli, "pickle", "pickle", "never unpickles")
    one_line_error(cli, "other_model", "made for another model", "mlp.down_proj")
    assert not (cli.root / "m_other").exists() and not (cli.root / "m_pickle").exists()


def test_bad_how_is_a_usage_error(cli):
    result = cli.runs["bad_how"]
    assert result.returncode == 2 and "Invalid value for '--how'" in result.stderr, result.stderr
    assert not (cli.root / "m_bad").exists()


def test_debug_shows_the_traceback_of_a_missing_directory(cli):
    result = cli.runs["debug"]
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "AdapterFileError" in result.stderr
    assert "does not exist" in result.stderr


def test_in_process_errors(cli, capsys):
    """The same `main` in process (no subprocess import cost): a missing option exits 2, export
    refuses a non-LoRA adapter for peft, merge refuses an existing OUT."""
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--base", str(cli.paths["base"])])
    assert exit_info.value.code == 2 and "Missing option" in capsys.readouterr().err
    assert (
        main(["export", str(cli.paths["sft"]), "--format", "peft", "--out", str(cli.root / "peft_sft")]) == 1
    )
    assert "'sft' adapter; PEFT's LoRA format holds LoRA only" in capsys.readouterr().err
    out = cli.root / "m_lora"
    assert (
        main(
            [
                "merge",
                "--base",
                str(cli.paths["base"]),
                "--adapter",
                str(cli.paths["lora_a"]),
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "exists; choose a new directory or pass --overwrite" in capsys.readouterr().err


def test_a_base_checkpoint_with_a_header_that_does_not_fit_its_bytes_is_refused(tmp_path, capsys):
    """Base checkpoints go through the one strict safetensors header parser (the adapters' one): a
    tensor whose shape needs more bytes than its range holds is an error naming the tensor, and
    nothing is written. (The checkpoint reader before it checked only that the range lay inside
    the file, so such a base merged into a corrupt output.)"""
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_llama().save_pretrained(base)
    al.save(al.inject(tiny_llama(), "lora", r=2), adapter)
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    key = next(k for k in header if k.endswith("input_layernorm.weight"))
    header[key]["shape"] = [2 * header[key]["shape"][0]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "is not a readable safetensors file" in err and key in err and not out.exists()


def test_every_command_has_help_with_an_example(capsys):
    for command in ("demo", "inspect", "merge", "export", "combine", "validate"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "Example" in text and f"adapterlab {command}" in text, command


def test_overwrite_replaces_an_existing_output(cli, capsys):
    out = cli.root / "m_over"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    assert (
        main(
            [
                "merge",
                "--base",
                str(cli.paths["base"]),
                "--adapter",
                str(cli.paths["lora_a"]),
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert not [p.name for p in cli.root.iterdir() if p.name.startswith(".m_over")]


# -- properties of the pieces ---------------------------------------------------------------------
TEST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL"]


@given(
    st.lists(
        st.tuples(st.sampled_from(TEST_DTYPES), st.lists(st.integers(0, 4), max_size=3)),
        min_size=1,
        max_size=6,
    )
)
def test_streamed_safetensors_round_trip_with_the_library(tmp_path_factory, specs):
    """Files our writer streams read back with safetensors; files safetensors writes read back with ours."""
    gen = torch.Generator().manual_seed(len(specs))
    tensors = {
        f"t{i}": (torch.randn(shape, generator=gen) * 100).to(DTYPES[dtype])
        for i, (dtype, shape) in enumerate(specs)
    }
    folder = tmp_path_factory.mktemp("st")
    writer = SafetensorsWriter(
        folder / "ours.safetensors", [(k, d, s) for k, (d, s) in zip(tensors, specs, strict=True)], {}
    )
    for key, t in tensors.items():
        writer.write(key, t)
    writer.close()
    save_file(tensors, folder / "lib.safetensors")
    with safe_open(folder / "ours.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())
    infos, _ = read_header(folder / "lib.safetensors")
    with open(folder / "lib.safetensors", "rb") as f:
        assert all(torch.equal(read_tensor(f, infos[k]), t) for k, t in tensors.items())


paths_st = st.lists(
    st.lists(st.sampled_from(["layers", "0", "1", "q_proj", "mlp", "up"]), min_size=1, max_size=4).map(
        ".".join
    ),
    min_size=1,
    max_size=8,
    unique=True,
)


@given(paths_st, st.sampled_from(["", "model.", "model.decoder."]), st.booleans())
def test_resolve_maps_every_path_through_one_prefix(paths, prefix, adapter_has_prefix):
    """With keys that differ from the module paths by one leading prefix (either side), every path
    resolves to its own key, or is reported ambiguous: never to a wrong key."""
    if adapter_has_prefix:
        adapter_paths, keys = [prefix + p for p in paths], [f"{p}.weight" for p in paths]
    else:
        adapter_paths, keys = paths, [f"{prefix}{p}.weight" for p in paths]
    found = locate(adapter_paths, keys)
    assert not found.missing
    for path, key in found.keys.items():
        assert key == (
            f"{path.removeprefix(prefix)}.weight" if adapter_has_prefix else f"{prefix}{path}.weight"
        )
    if not prefix:
        assert len(found.keys) == len(paths)
    for candidates in found.ambiguous.values():
        assert len(candidates) > 1


@given(st.lists(st.integers(0, 100), min_size=1, max_size=30), st.integers(1, 150))
def test_split_keeps_order_and_respects_the_shard_size(sizes, limit):
    infos = {f"t{i}": TensorInfo("U8", [n], 0, n, Path("x")) for i, n in enumerate(sizes)}
    shards = _split(Checkpoint(Path("."), [Path("x")], infos, {}), limit)
    assert [k for shard in shards for k in shard] == list(infos)
    totals = [sum(infos[k].nbytes for k in shard) for shard in shards]
    for shard, total in zip(shards, totals, strict=True):
        assert total <= limit or len(shard) == 1
    for total, following in zip(totals, shards[1:], strict=False):  # greedy: the next tensor did not fit
        assert total + infos[following[0]].nbytes > limit


@given(st.floats(0.001, 1000), st.sampled_from(["KB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_parse_size_units(value, unit):
    scale = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    if value * scale >= 1:
        assert parse_size(f"{value}{unit}") == int(value * scale)
