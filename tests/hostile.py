"""Helpers shared by the hostile-file tests and the base-checkpoint fuzz: the inputs (a tiny
sharded Llama checkpoint, two LoRA adapters, a combine YAML), the CLI in process with a hang
alarm, byte-and-mtime snapshots of directories, and special files (FIFO, socket, device links).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from contextlib import contextmanager
from pathlib import Path

import torch
from conftest import randomize_lora, tiny_llama

import adapterlab as al
from adapterlab.cli import main

SECONDS = float(os.environ.get("ADAPTERLAB_HANG_SECONDS", "30"))  # any one call; a blocked FIFO read hits it


class Hang(Exception):
    pass


@contextmanager
def alarm(seconds: float = SECONDS):
    """Raise `Hang` if the block takes over `seconds` (a blocked open of a FIFO is interrupted too)."""

    def ring(signum, frame):
        raise Hang(f"a call took over {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def build_inputs(root: Path) -> dict[str, Path]:
    """base (1-layer tiny Llama in shards + index), lora_a, lora_b (LoRA r=2), combine.yaml."""
    p = {name: root / name for name in ("base", "lora_a", "lora_b")}
    tiny_llama(layers=1).save_pretrained(p["base"], max_shard_size="20KB")
    for name, seed in (("lora_a", 1), ("lora_b", 2)):
        model = al.inject(tiny_llama(layers=1), "lora", r=2, alpha=4, targets=["q_proj", "v_proj"])
        randomize_lora(model, seed=seed)
        al.save(model, p[name])
    p["yaml"] = root / "combine.yaml"
    p["yaml"].write_text("adapters: {a: lora_a, b: lora_b}\nhow: linear\nout: combined\n")
    return p


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`adapterlab ARGS` in process under the alarm: (exit code, stderr, stdout)."""
    capsys.readouterr()
    with alarm():
        code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("adapterlab: error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under `roots` (links not followed): kind, bytes or link target, mode, mtime."""
    found = {}
    for root in roots:
        if not os.path.lexists(root):
            found[str(root)] = ("missing",)
            continue
        paths = [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
        for path in paths:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                body = path.read_bytes()
            else:
                body = None
            found[str(path)] = (stat.S_IFMT(st.st_mode), body, st.st_mode, st.st_mtime_ns)
    return found


def make_special(path: Path, kind: str) -> None:
    """Put a `kind` special file at `path`: fifo, socket, zero (symlink to /dev/zero), null
    (symlink to /dev/null), random (symlink to /dev/urandom), dir, loop (a symlink to itself)."""
    if os.path.lexists(path):
        os.remove(path) if not path.is_dir() or path.is_symlink() else __import__("shutil").rmtree(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        here = os.getcwd()
        os.chdir(path.parent)  # AF_UNIX paths are limited to 108 bytes; bind a relative name
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path.name)
            sock.close()
        finally:
            os.chdir(here)
    elif kind in ("zero", "null", "random"):
        os.symlink({"zero": "/dev/zero", "null": "/dev/null", "random": "/dev/urandom"}[kind], path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "loop":
        os.symlink(path.name, path)
    else:
        raise ValueError(kind)


SPECIAL_KINDS = ["fifo", "socket", "zero", "null", "random", "dir", "loop"]


def split(blob: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def float_names(header: dict) -> list[str]:
    return sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] in ("F32", "F16"))


def merged_equals_al_merge(out: Path, base: Path, adapter: Path) -> bool:
    """The merged checkpoint's weights equal al.merge of the adapter into the base, exactly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    al.load(model, adapter)
    state = al.unload(model, merge=True).state_dict()
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    return all(torch.equal(merged[k], state[k]) for k in merged) and set(merged) <= set(state)
