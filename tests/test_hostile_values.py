"""Hostile values in parseable files, and models with shared weights (issue "Hostile files and
careless commands, round 2", classes 3, 6, 8, 9 and 11; YAML, class 7, also in test_fuzz_yaml.py).

Every CLI outcome here is success or one line `adapterlab: error: …` with exit code 1: never a
traceback, never the last-resort "unexpected …" line (that one marks a bug), never a raw control
character on the terminal.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ConvNet, randomize_lora, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import adapterlab as al
from adapterlab.cli import main
from adapterlab.io import CONFIG_FILE, WEIGHTS_FILE
from adapterlab.layer import AdapterLayer

CLI = Path(sys.executable).parent / "adapterlab"
SRC = str(Path(__file__).resolve().parents[1] / "src")


# -- helpers -------------------------------------------------------------------------------------
def run(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result: tuple[int, str, str], *fragments: str) -> str:
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("adapterlab: error: "), (code, out, err)
    assert "unexpected" not in lines[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def edit_block(directory: Path, edit) -> Path:
    """Apply `edit(block)` to the adapterlab metadata block in the weights file's header."""
    path = directory / WEIGHTS_FILE
    header, data = split(path.read_bytes())
    block = json.loads(header["__metadata__"]["adapterlab"])
    edit(block, header) if edit.__code__.co_argcount == 2 else edit(block)
    header["__metadata__"]["adapterlab"] = json.dumps(block)
    path.write_bytes(join(header, data))
    return directory


def saved(model: nn.Module, directory: Path) -> Path:
    return al.save(model, directory)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Llama checkpoint, a LoRA, an SFT and a conv LoRA saved from it (or ConvNet)."""
    root = tmp_path_factory.mktemp("hostile")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    lora = al.inject(tiny_llama(), "lora", r=2, targets=["q_proj", "v_proj"])
    randomize_lora(lora)
    al.save(lora, root / "lora")
    sft = al.inject(tiny_llama(), "sft", targets=["o_proj"])
    for _, layer in al.model.adapter_layers(sft):
        delta = layer.deltas["default"]
        delta.set_support(torch.arange(5), torch.ones(5))
    al.save(sft, root / "sft")
    conv = al.inject(ConvNet(), "lora", r=2, targets=["conv2"])
    al.save(conv, root / "conv")
    return root


def copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# -- class 3: shared weights -----------------------------------------------------------------------
def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "q_proj"]])
@pytest.mark.parametrize("how", ["merge", "unload"])
def test_a_lora_on_a_tied_head_is_never_merged_into_the_shared_weight(targets, how):
    model = al.inject(tied_llama(), "lora", r=2, targets=targets)
    randomize_lora(model)
    x = torch.tensor([[1, 2, 3, 4]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x).logits
    with pytest.raises(al.MergeError, match=r"'lm_head'.*model\.embed_tokens\.weight.*untie"):
        al.merge(model) if how == "merge" else al.unload(model, merge=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-merged
    assert torch.equal(model(x).logits, expected)


def test_an_untied_head_still_merges_and_matches_the_unmerged_outputs():
    model = tied_llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    al.inject(model, "lora", r=2, targets=["lm_head"])
    randomize_lora(model)
    x = torch.tensor([[1, 2, 3, 4]])
    expected, embedding = model(x).logits, model.model.embed_tokens.weight.clone()
    al.merge(model)
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


class Reused(nn.Module):
    """One Linear registered at two paths (`a.0` and `b.0`), applied twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(6, 6))
        self.b = nn.Sequential(self.a[0])

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("targets", [["a.0"], ["b.0"]])
def test_adapting_one_place_of_a_reused_module_is_refused_naming_both(targets):
    model = Reused()
    with pytest.raises(al.TargetError, match=r"'a\.0'.*'b\.0'|'b\.0'.*'a\.0'"):
        al.inject(model, "lora", r=2, targets=targets)
    assert isinstance(model.a[0], nn.Linear) and model.a[0] is model.b[0]


@pytest.mark.parametrize("targets", [["0"], "all-linear", ["a.0", "b.0"]])
def test_a_reused_module_is_adapted_at_every_place_and_merges_consistently(targets, tmp_path):
    model = al.inject(Reused(), "lora", r=2, targets=targets)
    assert model.a[0] is model.b[0] and isinstance(model.a[0], AdapterLayer)
    randomize_lora(model, std=0.3)
    x = torch.randn(3, 6)
    expected = model(x)
    with torch.no_grad():
        layer = model.a[0]
        manual = layer.base_layer(x) + layer.deltas["default"](x, torch.zeros(3, 6))
        manual = layer.base_layer(torch.tanh(manual)) + layer.deltas["default"](
            torch.tanh(manual), torch.zeros(3, 6)
        )
    torch.testing.assert_close(expected, manual)
    al.save(model, tmp_path / "a")
    al.merge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    al.unmerge(model)
    loaded = al.load(Reused(), tmp_path / "a")
    assert loaded.a[0] is loaded.b[0] and isinstance(loaded.b[0], AdapterLayer)
    torch.testing.assert_close(loaded(x), expected)
    al.unload(model)
    assert type(model.a[0]) is nn.Linear and model.a[0] is model.b[0]


def tied_checkpoint(root: Path, both_keys: bool) -> Path:
    """A tied Llama saved by save_pretrained (one tensor for both), or by hand with both keys and
    tie_word_embeddings true in config.json (transformers re-ties them on load)."""
    from safetensors.torch import save_file

    model = tied_llama()
    model.save_pretrained(root / "tied")
    if both_keys:
        state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, root / "tied" / "model.safetensors", metadata={"format": "pt"})
    return root / "tied"


@pytest.mark.parametrize("both_keys", [False, True])
def test_cli_merge_and_validate_refuse_a_lora_on_a_tied_head(both_keys, tmp_path, capsys):
    base = tied_checkpoint(tmp_path, both_keys)
    model = al.inject(tied_llama(), "lora", r=2, targets=["lm_head"])
    randomize_lora(model)
    al.save(model, tmp_path / "head")
    merged = tmp_path / "merged"
    one_line_error(
        run(["merge", "--base", base, "--adapter", tmp_path / "head", "--out", merged], capsys), "tied"
    )
    assert not merged.exists()
    code, out, err = run(["validate", tmp_path / "head", "--base", base], capsys)
    assert code == 1 and "FAIL  modules" in out and "tied" in out, out


# -- class 6: small files that allocate a lot ------------------------------------------------------
def limited(args: list[str], cwd: Path, gib: int = 8) -> subprocess.CompletedProcess:
    """The CLI in a subprocess whose address space is capped at `gib` GiB: a big allocation fails there."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (gib * 2**30, gib * 2**30))

    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(CLI), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
        preexec_fn=cap,
    )


def check_limited(result: subprocess.CompletedProcess, *fragments: str) -> None:
    one_line_error((result.returncode, result.stdout, result.stderr), *fragments)


@pytest.mark.parametrize("shape", [[60000, 60000], [2**20, 2**20], [2**24, 2**24]])
def test_a_small_sft_declaring_a_huge_module_is_refused_before_allocating(inputs, tmp_path, shape):
    big = copy(inputs / "sft", tmp_path / "big")

    def grow(block):
        for entry in block["fingerprint"]["modules"].values():
            entry["shape"] = shape

    edit_block(big, grow)
    assert (big / WEIGHTS_FILE).stat().st_size < 10_000
    check_limited(
        limited(["export", big, "--format", "dense", "--out", tmp_path / "d.safetensors"], tmp_path), "GB"
    )
    assert not (tmp_path / "d.safetensors").exists()
    (tmp_path / "c.yaml").write_text(
        f"adapters: {{a: {big}, b: {big}}}\nkind: sparse\nout: {tmp_path / 'c'}\n"
    )
    check_limited(limited(["combine", tmp_path / "c.yaml"], tmp_path), "GB")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("rank", [64, 10**6, 10**9, 2**62])
def test_a_combine_rank_above_the_layers_is_refused_before_allocating(inputs, tmp_path, rank):
    (tmp_path / "c.yaml").write_text(
        f"adapters: {{a: {inputs / 'lora'}, b: {inputs / 'lora'}}}\nhow: svd\nrank: {rank}\nout: {tmp_path / 'c'}\n"
    )
    check_limited(limited(["combine", tmp_path / "c.yaml"], tmp_path), "rank")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("r", [2**31, 2**62, 2**63, 10**30])
def test_a_huge_lora_rank_in_a_file_is_an_adapter_file_error_everywhere(inputs, tmp_path, capsys, r):
    bad = edit_block(copy(inputs / "lora", tmp_path / "bad"), lambda b: b["config"].update(r=r))
    with pytest.raises(al.AdapterFileError, match="r="):
        al.load(tiny_llama(), bad)
    one_line_error(run(["inspect", bad], capsys), "r=")
    one_line_error(
        run(["merge", "--base", inputs / "base", "--adapter", bad, "--out", tmp_path / "m"], capsys)
    )
    code, out, err = run(["validate", bad, "--base", inputs / "base"], capsys)
    assert code == 1 and "FAIL  format" in out and "r=" in out, (out, err)


# -- class 8: parseable files that raised other exceptions -----------------------------------------
def set_entry(**values):
    def edit(block):
        entry = next(iter(block["fingerprint"]["modules"].values()))
        entry.update(values)

    return edit


def rename_module(new: str):
    """Move the first module to path `new`: in the fingerprint and in its tensors' keys."""

    def edit(block, header):
        modules = block["fingerprint"]["modules"]
        old = next(iter(modules))
        modules[new] = modules.pop(old)
        prefix = f"base_model.model.{old}."
        for key in [k for k in header if k.startswith(prefix)]:
            header[f"base_model.model.{new}.{key[len(prefix) :]}"] = header.pop(key)

    return edit


def set_method(name: str):
    def edit(block):
        block["method"] = name
        block["config"]["method"] = name

    return edit


CASES = {
    "groups_not_dividing": ("conv", set_entry(groups=3)),
    "groups_zero": ("conv", set_entry(groups=0)),
    "conv2d_3_dims": ("conv", set_entry(shape=[8, 8, 3])),
    "conv1d_hf_1_dim": ("lora", set_entry(type="Conv1D", shape=[32])),
    "linear_3_dims": ("lora", set_entry(shape=[32, 32, 1])),
    "zero_dim": ("lora", set_entry(shape=[0, 32])),
    "huge_dims": ("lora", set_entry(shape=[2**40, 2**40])),
    "long_type": ("lora", set_entry(type="Linear" * 1000)),
    "empty_component": ("lora", rename_module("model..q_proj")),
    "leading_dot": ("lora", rename_module(".q_proj")),
    "through_attribute": ("lora", rename_module("training.q_proj")),
    "through_weight": ("lora", rename_module("model.layers.0.self_attn.v_proj.weight.x")),
    "space_in_path": ("lora", rename_module("model.layers.0 .q_proj")),
    "method_upper_levi": ("lora", set_method("LEVI")),
    "method_mixed_lora": ("lora", set_method("LoRA")),
    "alpha_1e308": ("lora", lambda b: b["config"].update(alpha=1e308)),
    "alpha_huge_int": ("lora", lambda b: b["config"].update(alpha=10**400)),
    "dropout_huge_int": ("lora", lambda b: b["config"].update(dropout=10**400)),
}


BUILT_BY_COMBINE_ONLY = {"through_attribute", "through_weight"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_fingerprint_and_config_values_are_one_line_errors_in_every_command(
    inputs, tmp_path, capsys, case
):
    seed, edit = CASES[case]
    bad = edit_block(copy(inputs / seed, tmp_path / "bad"), edit)
    results = {
        "inspect": run(["inspect", bad], capsys),
        "validate": run(["validate", bad, "--base", inputs / "base"], capsys),
        "export": run(["export", bad, "--format", "dense", "--out", tmp_path / "d.safetensors"], capsys),
        "merge": run(["merge", "--base", inputs / "base", "--adapter", bad, "--out", tmp_path / "m"], capsys),
    }
    (tmp_path / "c.yaml").write_text(f"adapters: {{a: {bad}}}\nkind: dense\nout: {tmp_path / 'c'}\n")
    results["combine"] = run(["combine", tmp_path / "c.yaml"], capsys)
    for command, (code, out, err) in results.items():
        assert code in (0, 1) and "Traceback" not in err and "unexpected" not in err, (command, err)
        if code == 1 and command != "validate":
            one_line_error((code, out, err))
    if case not in BUILT_BY_COMBINE_ONLY:  # export rebuilds one module at a time, not the model tree
        assert results["export"][0] == 1 and not (tmp_path / "d.safetensors").exists()
    assert results["combine"][0] == 1 and not (tmp_path / "c").exists()
    with pytest.raises(al.AdapterlabError):
        al.load(tiny_llama() if seed == "lora" else ConvNet(), bad)


@pytest.mark.parametrize("alpha", [1e308, 2.0**70, 1e40])
def test_a_scale_that_overflows_is_refused_on_load_and_never_exported_as_inf(inputs, tmp_path, capsys, alpha):
    bad = edit_block(copy(inputs / "lora", tmp_path / "bad"), lambda b: b["config"].update(alpha=alpha))
    with pytest.raises(al.AdapterFileError, match="alpha"):
        al.load(tiny_llama(), bad)
    one_line_error(run(["export", bad, "--format", "dense", "--out", tmp_path / "d.safetensors"], capsys))
    assert not (tmp_path / "d.safetensors").exists()


def test_factors_whose_delta_overflows_fail_validate_and_export(inputs, tmp_path, capsys):
    """Finite factors, finite alpha, but ΔW = s·B·A overflows float32: validate fails, export writes nothing."""
    model = al.inject(tiny_llama(), "lora", r=2, alpha=2.0**60, targets=["q_proj"])
    with torch.no_grad():
        for _, _, delta in al.model.deltas(model, "default"):
            delta.lora_A.weight.fill_(1e30)
            delta.lora_B.weight.fill_(1e30)
    al.save(model, tmp_path / "inf")
    code, out, _ = run(["validate", tmp_path / "inf", "--base", inputs / "base"], capsys)
    assert code == 1 and "FAIL  tensors" in out and "Inf" in out, out
    one_line_error(
        run(["export", tmp_path / "inf", "--format", "dense", "--out", tmp_path / "d"], capsys), "NaN/Inf"
    )
    assert not (tmp_path / "d").exists()


# -- class 9: terminal escapes ----------------------------------------------------------------------
NASTY = ["\x1b]0;pwned\x07\x1b[2J", "\x9b31m", "abc\u202edcba", "\r\rover", "zero\u200bwidth", "a\nb"]


@pytest.mark.parametrize("value", NASTY)
def test_inspect_and_validate_never_print_raw_control_characters(inputs, tmp_path, capsys, value):
    bad = edit_block(copy(inputs / "lora", tmp_path / "bad"), lambda b: b.update(library_version=value))
    outputs = [
        run(["inspect", bad], capsys),
        run(["validate", bad, "--base", inputs / "base"], capsys),
        run(["inspect", bad, "--json"], capsys),
    ]
    for code, out, err in outputs:
        assert code == 0, err
        text = out + err
        assert not any(c in text for c in "\x1b\x9b\x07\r\u202e\u200b"), repr(text)
    assert value.split("\n")[0] not in outputs[0][1] or value.split("\n")[0].isprintable()
    from adapterlab.text import printable

    assert printable(value) in outputs[0][1]


@pytest.mark.parametrize("field", ["library_version", "method"])
def test_errors_quoting_file_values_are_escaped_and_short(inputs, tmp_path, capsys, field):
    value = "\x1b[2J" + "x" * 100_000
    bad = edit_block(copy(inputs / "lora", tmp_path / "bad"), lambda b: b.update({field: [value]}))
    line = one_line_error(run(["inspect", bad], capsys))
    assert "\x1b" not in line and len(line) < 1000


def test_printable_and_excerpt():
    from adapterlab.text import excerpt, printable

    assert printable("ok text") == "ok text"
    assert printable("\x1b[2J\u202e\x85") == "\\x1b[2J\\u202e\\x85"
    big = ["\x1b" * 10] * 10**6
    short = excerpt(big)
    assert len(short) < 120 and "\x1b" not in short and "…" in short
    nested: list = []
    nested.append(nested)
    assert len(excerpt(nested)) < 120


# -- class 11: PEFT fan_in_fan_out on a Linear ---------------------------------------------------
@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "k_proj", "v_proj"]])
def test_cli_merge_of_a_peft_lora_with_fan_in_fan_out_equals_al_merge(inputs, tmp_path, capsys, targets):
    """peft resets fan_in_fan_out for a Linear (and al.load ignores it); the streaming merge must too,
    square (q_proj 32×32) or not (k_proj 16×32)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    config["fan_in_fan_out"] = True
    (tmp_path / "peft" / CONFIG_FILE).write_text(json.dumps(config))
    assert (
        run(
            ["merge", "--base", inputs / "base", "--adapter", tmp_path / "peft", "--out", tmp_path / "m"],
            capsys,
        )[0]
        == 0
    )
    expected = al.load(tiny_llama(), tmp_path / "peft")
    al.merge(expected)
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "m" / "model.safetensors")
    for path, layer in al.model.adapter_layers(expected):
        torch.testing.assert_close(merged[f"{path}.weight"], layer.base_layer.weight, atol=1e-6, rtol=1e-6)
    code, out, _ = run(["validate", tmp_path / "peft", "--base", inputs / "base"], capsys)
    assert code == 0, out


# -- class 7: YAML files that are not files --------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero"])
def test_a_combine_config_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, capsys, kind):
    config = tmp_path / "c.yaml"
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "directory":
        config.mkdir()
    else:
        config.symlink_to("/dev/zero")
    one_line_error(run(["combine", config], capsys), "config")


def test_scalar_aliases_are_allowed_within_the_limit(inputs, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"x: &w 0.5\nadapters: {{a: {inputs / 'lora'}}}\nweights: {{a: *w}}\nout: {tmp_path / 'o'}\n"
    )
    one_line_error(run(["combine", config], capsys), "unknown key 'x'")  # the alias itself parsed fine


@pytest.mark.parametrize("name", ["LEVI", "Levi", "levi "])
def test_a_levi_file_with_a_method_name_in_another_case_is_refused_everywhere(inputs, tmp_path, capsys, name):
    from test_levi import tiny_bert

    from adapterlab.methods.levi import LEVI

    levi = LEVI(tiny_bert(), num_classes=2, layers=[1], side_dim=8)
    bad = edit_block(al.levi.save(levi, tmp_path / "levi"), set_method(name))
    for args in (
        ["inspect", bad],
        ["export", bad, "--format", "dense", "--out", tmp_path / "d.safetensors"],
        ["merge", "--base", inputs / "base", "--adapter", bad, "--out", tmp_path / "m"],
    ):
        one_line_error(run(args, capsys))
    code, out, _ = run(["validate", bad, "--base", inputs / "base"], capsys)
    assert code == 1 and "FAIL  format" in out, out
    for call in (lambda: al.load(tiny_llama(), bad), lambda: al.levi.load(tiny_bert(), bad)):
        with pytest.raises(al.AdapterFileError, match="method"):
            call()


class Chain(nn.Module):
    """One Linear registered at `places` paths (p0.lin, p1.lin, …), applied once per place."""

    def __init__(self, places: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = nn.Linear(5, 5)
        self.parts = nn.ModuleList(nn.ModuleDict({"lin": shared}) for _ in range(places))

    def forward(self, x):
        for part in self.parts:
            x = torch.tanh(part["lin"](x))
        return x


@given(places=st.integers(2, 4), chosen=st.sets(st.integers(0, 3), min_size=1))
def test_a_reused_module_is_adapted_everywhere_or_refused_naming_the_rest(places, chosen):
    chosen = sorted(i for i in chosen if i < places) or [0]
    model = Chain(places)
    targets = [f"parts.{i}.lin" for i in chosen]
    if len(chosen) < places:
        missing = next(f"parts.{i}.lin" for i in range(places) if i not in chosen)
        with pytest.raises(al.TargetError, match=re.escape(repr(missing))):
            al.inject(model, "lora", r=2, targets=targets)
        assert all(type(part["lin"]) is nn.Linear for part in model.parts)
        return
    al.inject(model, "lora", r=2, targets=targets)
    randomize_lora(model, std=0.3)
    assert len({id(part["lin"]) for part in model.parts}) == 1
    x = torch.randn(2, 5)
    expected = model(x)
    al.merge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    al.unload(model)
    assert len({id(part["lin"]) for part in model.parts}) == 1 and type(model.parts[0]["lin"]) is nn.Linear
