"""Careless commands, round 2 (issue 15), classes 4, 5 and 10, through the real CLI (in process):

4. an OUT that is, contains or lies inside an input, or is a device node, FIFO, socket or file,
   is refused before anything is touched, with or without --overwrite;
5. symlinks: a symlinked OUT is followed (the link stays a link, its target is replaced, nothing
   is left beside either); a base's extra files that link outside the base are never copied;
10. 242-255-byte names and glob characters work, and OS errors (ENOSPC, EROFS, EACCES,
   ENAMETOOLONG, EBUSY, shutil.Error, …) are one-line errors that leave inputs and OUT intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import tiny_llama
from hostile import build_inputs, cli, make_special, merged_equals_al_merge, one_line_error, snapshot

import adapterlab as al
from adapterlab.io import read_adapter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    build_inputs(root)
    return root


@pytest.fixture
def work(inputs, tmp_path) -> Path:
    shutil.copytree(inputs, tmp_path / "in", symlinks=True)
    return tmp_path / "in"


def merge_args(w: Path, out: Path, *extra) -> list:
    return ["merge", "--base", w / "base", "--adapter", w / "lora_a", "--out", out, *extra]


def hidden(directory: Path) -> list[str]:
    """What a write may leave behind: `.NAME.tmp-*` / `.NAME.old-*` entries."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# -- 4. outputs that would destroy inputs ---------------------------------------------------------
def out_path(w: Path, where: str) -> Path:
    """The OUT of each case; special ones are created here."""
    if where in ("fifo", "socket", "file", "device"):
        path = w.parent / f"out_{where}"
        if where == "device":
            if os.geteuid() != 0:
                pytest.skip("creating a device node needs root")
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
        elif where == "file":
            path.write_text("precious")
        else:
            make_special(path, where)
        return path
    if where.startswith("link to "):
        link = w.parent / "out_link"
        link.symlink_to(out_path(w, where.removeprefix("link to ")))
        return link
    return {
        "the base": w / "base",
        "the adapter": w / "lora_a",
        "the parent of the inputs": w,
        "inside the base": w / "base" / "merged",
        "inside the adapter": w / "lora_a" / "merged",
        "the base, spelled with ..": w / "lora_a" / ".." / "base",
    }[where]


OUTS = [
    "the base",
    "the adapter",
    "the parent of the inputs",
    "inside the base",
    "inside the adapter",
    "the base, spelled with ..",
    "link to the base",
    "link to the parent of the inputs",
    "fifo",
    "socket",
    "file",
    "device",
    "link to device",
]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", OUTS)
def test_merge_refuses_an_out_that_would_destroy_an_input(work, where, overwrite, capsys):
    out = out_path(work, where)
    before = snapshot(work.parent)
    code, err, _ = cli(merge_args(work, out, *(["--overwrite"] if overwrite else [])), capsys)
    one_line_error(code, err)
    assert snapshot(work.parent) == before


@pytest.mark.parametrize("cwd, out", [("", "."), ("lora_a", ".."), ("lora_a", "."), ("base", "../lora_a/..")])
def test_relative_outs_are_compared_after_resolving(work, cwd, out, monkeypatch, capsys):
    monkeypatch.chdir(work / cwd)
    before = snapshot(work.parent)
    code, err, _ = cli(merge_args(work, Path(out), "--overwrite"), capsys)
    one_line_error(code, err)
    assert snapshot(work.parent) == before


def test_out_dot_in_an_empty_directory_is_written_there(work, tmp_path, monkeypatch, capsys):
    """`--out .` names the working directory (not the empty name): the merge lands in it."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, err, _ = cli(merge_args(work, Path(".")), capsys)
    assert code == 0, err
    assert merged_equals_al_merge(here, work / "base", work / "lora_a") and hidden(tmp_path) == []


@pytest.mark.parametrize("where", [w for w in OUTS if "base" not in w])
def test_export_and_combine_refuse_an_out_that_would_destroy_an_input(work, where, capsys):
    out = out_path(work, where)
    before = snapshot(work.parent)
    code, err, _ = cli(["export", work / "lora_a", "--format", "peft", "--out", out], capsys)
    one_line_error(code, err)
    (work.parent / "c.yaml").write_text(
        f"adapters: {{a: {work / 'lora_a'}, b: {work / 'lora_b'}}}\nout: {out}\n"
    )
    before = snapshot(work.parent)
    code, err, _ = cli(["combine", work.parent / "c.yaml"], capsys)
    one_line_error(code, err)
    assert snapshot(work.parent) == before


@pytest.mark.parametrize("where", ["fifo", "socket", "device", "link to device", "inside the adapter"])
def test_export_dense_refuses_anything_but_a_regular_file_outside_the_adapter(work, where, capsys):
    out = out_path(work, where)
    if where == "inside the adapter":
        out = work / "lora_a" / "adapter_model.safetensors"
    before = snapshot(work.parent)
    code, err, _ = cli(["export", work / "lora_a", "--format", "dense", "--out", out], capsys)
    one_line_error(code, err)
    assert snapshot(work.parent) == before


# -- 5. symlinks -----------------------------------------------------------------------------------
def test_saving_into_a_symlink_to_a_directory_replaces_its_target_and_keeps_the_link(work):
    real, link = work.parent / "real", work.parent / "link"
    shutil.copytree(work / "lora_b", real)
    link.symlink_to(real)
    model = al.load(tiny_llama(layers=1), work / "lora_a")
    for _ in range(2):  # the second save replaces the first through the link
        assert al.save(model, link) == link
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert (real / "adapter_model.safetensors").read_bytes() == (
            work / "lora_a" / "adapter_model.safetensors"
        ).read_bytes()
        assert hidden(work.parent) == []


def test_merge_and_export_through_a_symlinked_out_keep_the_link(work, capsys):
    real, link = work.parent / "real", work.parent / "link"
    real.mkdir()
    link.symlink_to(real)
    code, err, _ = cli(merge_args(work, link, "--overwrite"), capsys)
    assert code == 0, err
    assert link.is_symlink() and merged_equals_al_merge(real, work / "base", work / "lora_a")
    assert hidden(work.parent) == []
    dense, dense_link = work.parent / "d.safetensors", work.parent / "d_link.safetensors"
    dense.write_bytes(b"old")
    dense_link.symlink_to(dense)
    code, err, _ = cli(["export", work / "lora_a", "--format", "dense", "--out", dense_link], capsys)
    assert code == 0, err
    assert dense_link.is_symlink() and dense.read_bytes()[:8] != b"old" and hidden(work.parent) == []


def test_a_bases_symlinks_are_copied_only_when_they_stay_inside_it(work, capsys):
    """tokenizer.json -> a file inside the base: copied as a file, same content; secret.txt -> a
    file outside the base, and a dangling link: left out, with a one-line warning naming them."""
    base = work / "base"
    (base / "sub").mkdir()
    (base / "sub" / "tok.json").write_text('{"inside": true}')
    (base / "tokenizer.json").symlink_to("sub/tok.json")
    secret = work.parent / "secret.txt"
    secret.write_text("outside the base")
    (base / "secret.txt").symlink_to(secret)
    (base / "dangling.json").symlink_to(work.parent / "nowhere.json")
    out = work.parent / "merged"
    code, err, _ = cli(merge_args(work, out), capsys)
    assert code == 0, err
    assert (out / "tokenizer.json").read_text() == '{"inside": true}' and not (
        out / "tokenizer.json"
    ).is_symlink()
    assert not os.path.lexists(out / "secret.txt") and not os.path.lexists(out / "dangling.json")
    assert all("outside the base" not in p.read_text(errors="ignore") for p in out.iterdir())
    warning = [line for line in err.splitlines() if line.startswith("adapterlab: warning: ")]
    assert len(warning) == 1 and "secret.txt" in warning[0] and "dangling.json" in warning[0]


def test_links_in_an_existing_out_are_kept_as_links_never_read(work):
    """A user's symlink to /dev/zero (or a FIFO) inside an adapter directory being re-saved is
    carried over as a link (a FIFO: left out), not read — reading it would never end."""
    target = work.parent / "ad"
    model = al.load(tiny_llama(layers=1), work / "lora_a")
    al.save(model, target)
    (target / "zero").symlink_to("/dev/zero")
    os.mkfifo(target / "pipe")
    al.save(model, target)
    assert os.readlink(target / "zero") == "/dev/zero" and not os.path.lexists(target / "pipe")


def test_save_pretrained_replaces_a_link_among_its_files_and_never_writes_through_it(work):
    """save_pretrained writes its files into a directory: a symlink there named like one of them
    (adapter_config.json -> a file outside) is replaced by the file; the outside file is untouched."""
    outside = work.parent / "precious.json"
    outside.write_text("precious")
    target = work.parent / "pretrained"
    target.mkdir()
    (target / "adapter_config.json").symlink_to(outside)
    al.load(tiny_llama(layers=1), work / "lora_a").save_pretrained(target)
    assert outside.read_text() == "precious" and not (target / "adapter_config.json").is_symlink()
    assert read_adapter(target)[1].keys() == read_adapter(work / "lora_a")[1].keys()


# -- 10. names and OS errors -----------------------------------------------------------------------
NAMES = ["a" * 242, "b" * 250, "c" * 255, "é" * 127, "m[x]", "a*b", "q?", "m[x", "{a,b}"]


@pytest.mark.parametrize("name", NAMES, ids=lambda n: f"{n[:6]}-{len(n.encode())}B")
def test_long_and_glob_names_work_for_every_writer(work, name, capsys):
    model = al.load(tiny_llama(layers=1), work / "lora_a")
    parent = work.parent / "outs"
    parent.mkdir()
    neighbour = parent / "mx"  # `m[x]` as a glob would match it
    neighbour.mkdir()
    (parent / ".mx.old-12345678").mkdir()
    for _ in range(2):  # new, then replaced (the swap's old sibling needs a name too)
        al.save(model, parent / name)
        assert read_adapter(parent / name)[1].keys() == read_adapter(work / "lora_a")[1].keys()
        code, err, _ = cli(merge_args(work, parent / f"{name}", "--overwrite"), capsys)
        assert code == 0, err
        code, err, _ = cli(["export", work / "lora_a", "--format", "peft", "--out", parent / name], capsys)
        assert code == 0, err
    assert sorted(p.name for p in parent.iterdir()) == sorted([".mx.old-12345678", "mx", name])


@pytest.mark.parametrize("name", NAMES, ids=lambda n: f"{n[:6]}-{len(n.encode())}B")
def test_repair_finds_its_own_remains_by_exact_prefix(work, name):
    """Killed between the swap's renames: no NAME, its old version at `.NAME.old-*`, a temp dir.
    The next save puts the old one back (then replaces it) and removes the rest; a neighbour's
    remains (`.mx.old-*`, which `m[x]` would match as a glob) are not touched."""
    from adapterlab.files.fs import sibling_prefix

    model = al.load(tiny_llama(layers=1), work / "lora_a")
    target = work.parent / name
    al.save(al.load(tiny_llama(layers=1), work / "lora_b"), target)
    (work.parent / "mx").mkdir()
    (work.parent / ".mx.old-12345678").mkdir()
    os.rename(target, work.parent / f"{sibling_prefix(name, 'old')}12345678")
    (work.parent / f"{sibling_prefix(name, 'tmp')}abcdefgh").mkdir()
    with pytest.raises(al.AdapterFileError, match="interrupted save"):
        al.load(tiny_llama(layers=1), target)
    al.save(model, target)
    assert sorted(p.name for p in work.parent.iterdir()) == sorted(["in", "mx", ".mx.old-12345678", name])


def test_a_name_over_255_bytes_is_a_one_line_error(work, capsys):
    code, err, _ = cli(merge_args(work, work.parent / ("x" * 256)), capsys)
    one_line_error(code, err, "ENAMETOOLONG")


ERRNOS = [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG, errno.EBUSY, errno.EDQUOT, errno.EIO]


def failing(monkeypatch, where: str, code: int) -> None:
    """Make one kind of step of a write fail with OSError(code) (shutil.Error for 'copy')."""

    def boom(*args, **kwargs):
        if where == "copy":
            raise shutil.Error([(str(args[0]), "dst", "[Errno 5] Input/output error")])
        raise OSError(code, os.strerror(code), str(args[0]) if args else None)

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    elif where == "mkdtemp":
        monkeypatch.setattr(tempfile, "mkdtemp", boom)
    elif where == "rename":
        for name in ("rename", "replace"):
            real = getattr(os, name)
            monkeypatch.setattr(
                os, name, lambda src, dst, real=real: boom(src) if ".tmp-" in str(src) else real(src, dst)
            )
    elif where == "copy":
        monkeypatch.setattr(shutil, "copyfileobj", boom)
        monkeypatch.setattr(shutil, "copy2", boom)


WRITERS = {
    "merge": lambda w, out: merge_args(w, out, "--overwrite"),
    "export peft": lambda w, out: ["export", w / "lora_a", "--format", "peft", "--out", out],
    "export dense": lambda w, out: ["export", w / "lora_a", "--format", "dense", "--out", out],
    "combine": lambda w, out: ["combine", w.parent / "c.yaml"],
}


@pytest.mark.parametrize("where", ["fsync", "mkdtemp", "rename", "copy"])
@pytest.mark.parametrize("code", ERRNOS, ids=lambda c: errno.errorcode[c])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_os_errors_are_one_line_and_leave_inputs_and_out_intact(
    work, writer, code, where, monkeypatch, capsys
):
    out = work.parent / ("d.safetensors" if "dense" in writer else "o")
    (work.parent / "c.yaml").write_text(
        f"adapters: {{a: {work / 'lora_a'}, b: {work / 'lora_b'}}}\nout: {out}\n"
    )
    args = WRITERS[writer](work, out)
    first = cli(args, capsys)
    assert first[0] == 0, first  # an existing OUT, to be kept
    if where == "copy" and writer != "merge":  # a user's file in OUT is carried over by copying
        (out / "README.md").write_text("mine") if out.is_dir() else pytest.skip("nothing is copied")
    if where == "mkdtemp" and "dense" in writer:
        pytest.skip("a single file needs no temp directory")
    before = snapshot(work, out)
    failing(monkeypatch, where, code)
    result, err, _ = cli(args, capsys)
    monkeypatch.undo()
    line = one_line_error(result, err)
    assert ("copying failed" if where == "copy" else f"({errno.errorcode[code]})") in line, line
    assert snapshot(work, out) == before and hidden(out.parent) == []
