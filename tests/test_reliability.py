"""Reliability: saves killed at random points and at every step, concurrent saves, merge's
numerical safety, and atomic model changes (an error leaves the model exactly as it was).

CI runs the small counts below. The long runs in docs/reliability.md set them by environment:
    ADAPTERLAB_KILLS=500 ADAPTERLAB_CONCURRENT_SAVES=200 python -m pytest -q -s tests/test_reliability.py
(-s prints what each test measured).
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, read_weights, tiny_llama
from safetensors.torch import save_file

import adapterlab as al
from adapterlab import io
from adapterlab.io import WEIGHTS_FILE

KILLS = int(os.environ.get("ADAPTERLAB_KILLS", "20"))
CONCURRENT_SAVES = int(os.environ.get("ADAPTERLAB_CONCURRENT_SAVES", "10"))
CYCLES = int(os.environ.get("ADAPTERLAB_CYCLES", "1000"))

pytestmark = pytest.mark.usefixtures("single_thread")


# -- two different adapters on one model, and their files --------------------------------------------
def two_adapters() -> torch.nn.Module:
    """A tiny Llama with a LoRA "a" (PEFT-style files) and a sparse SFT "b" (our JSON block)."""
    model = al.inject(tiny_llama(), "lora", name="a", r=2, targets=["q_proj", "v_proj"])
    randomize_lora(model, adapter="a")
    al.inject(model, "sft", name="b", targets=["o_proj"])
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, al.SparseDelta):
            module.set_support(
                torch.randperm(module.numel, generator=gen)[:16].sort().values, torch.randn(16, generator=gen)
            )
    return model


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, {"a": files, "b": files}): the bytes a complete save of each adapter writes."""
    model = two_adapters()
    tmp = tmp_path_factory.mktemp("refs")
    return model, {name: files_of(al.save(model, tmp / name, name=name)) for name in "ab"}


def which(directory: Path, refs: dict[str, dict[str, bytes]]) -> str:
    """The adapter `directory` holds, byte for byte ("a" or "b"); anything else fails."""
    got = files_of(directory)
    found = [name for name, files in refs.items() if files == got]
    assert found, f"{directory} holds neither adapter completely: {sorted(got)}"
    return found[0]


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


# -- processes -------------------------------------------------------------------------------------
def fork(work) -> int:
    """Run `work()` in a forked child (torch is imported already, so this costs milliseconds)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            work()
            code = 0
        except BaseException:  # noqa: BLE001  (report anything, then exit non-zero)
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int, timeout: float = 60) -> int:
    """The child's exit code (-9: killed); a child still running after `timeout` s is a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} hung for {timeout} s")


def read_byte(fd: int, timeout: float = 60) -> bytes:
    """One byte from a pipe, or b"" if the writer exited; a hang past `timeout` s fails."""
    assert select.select([fd], [], [], timeout)[0], f"no word from the child in {timeout} s"
    return os.read(fd, 1)


def state_after_kill(target: Path, refs: dict, model: torch.nn.Module) -> str:
    """Check what a killed save left: one complete adapter that loads, or (killed between the
    two renames) no directory, the old one beside it, and a load error that says so."""
    if not target.exists():
        assert any(name.startswith(f".{target.name}.old-") for name in leftovers(target))
        with pytest.raises(al.AdapterFileError, match=r"interrupted save left the previous version"):
            al.load(model, target, name="check")
        return "between renames"
    name = which(target, refs)
    al.load(model, target, name="check")
    al.delete(model, "check")
    return name


# -- 2. interrupted writes -------------------------------------------------------------------------
def test_saves_killed_at_random_points_leave_one_complete_adapter(saved, tmp_path):
    model, refs = saved
    target = tmp_path / "ad"
    al.save(model, target, name="a")
    reader = tiny_llama()
    rng = random.Random(0)
    seen, saves, litter = Counter(), 0, 0
    for _ in range(KILLS):
        ready, done = os.pipe()

        def work(ready=ready, done=done):
            os.close(ready)
            for i in range(10**9):  # alternate the two adapters until killed
                al.save(model, target, name="ab"[i % 2])
                os.write(done, b".")

        pid = fork(work)
        os.close(done)
        assert read_byte(ready) == b".", "the child could not save"
        time.sleep(rng.uniform(0, 0.08))  # a save takes ~40 ms here: kill at any point of one
        os.kill(pid, signal.SIGKILL)
        assert exit_code(pid) == -signal.SIGKILL
        saves += 1 + len(os.read(ready, 1 << 16))
        os.close(ready)
        litter += bool(leftovers(target))
        seen[state_after_kill(target, refs, reader)] += 1
    al.save(model, target, name="a")  # the next save cleans up whatever the kills left
    assert leftovers(target) == [] and which(target, refs) == "a"
    print(
        f"\n{KILLS} kills during {saves} completed saves: states {dict(seen)}; "
        f"{litter} left temp dirs, all cleaned by the next save"
    )


def tree_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_sharded_merges_killed_at_random_points_leave_one_complete_output(tmp_path):
    """`adapterlab merge`'s writer (checkpoint.run_merge), killed at random points while it
    alternates two different merges into one OUT: OUT is always one complete merged checkpoint,
    byte for byte, or (killed between its two renames) absent with the old one beside it."""
    from adapterlab.checkpoint import plan_merge, run_merge

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base, max_shard_size="40KB")
    assert len(list(base.glob("*.safetensors"))) >= 3
    model = al.inject(tiny_llama(), "lora", r=2)
    randomize_lora(model)
    al.save(model, adapter)
    plans = [plan_merge(base, [adapter], [w], shard_size=60_000) for w in (1.0, -0.5)]
    out = tmp_path / "merged"
    refs = {}
    for i, plan in enumerate(plans):
        start = time.monotonic()
        run_merge(plan, out, overwrite=True, progress=False)
        seconds = time.monotonic() - start
        refs["ab"[i]] = tree_of(out)
    assert refs["a"] != refs["b"] and "model.safetensors.index.json" in refs["a"]
    rng = random.Random(1)
    seen = Counter()
    for _ in range(KILLS):
        ready, done = os.pipe()

        def work(ready=ready, done=done):
            os.close(ready)
            for i in range(10**9):
                run_merge(plans[i % 2], out, overwrite=True, progress=False)
                os.write(done, b".")

        pid = fork(work)
        os.close(done)
        assert read_byte(ready) == b".", "the child could not merge"
        time.sleep(rng.uniform(0, 1.2 * seconds))
        os.kill(pid, signal.SIGKILL)
        assert exit_code(pid) == -signal.SIGKILL
        os.close(ready)
        olds = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.old-")]
        if not out.exists():  # killed between the two renames: one complete old output beside it
            assert len(olds) == 1 and tree_of(olds[0]) in refs.values()
            seen["between renames"] += 1
        else:
            got = tree_of(out)
            found = [name for name, files in refs.items() if files == got]
            assert found, f"OUT holds neither merge completely: {sorted(got)}"
            seen[found[0]] += 1
        for p in tmp_path.iterdir():  # what a kill leaves beside OUT is hidden and never an output
            assert p.name in ("base", "adapter", "merged") or p.name.startswith(
                (".merged.tmp-", ".merged.old-")
            )
    run_merge(plans[0], out, overwrite=True, progress=False)  # the next merge repairs / cleans up
    assert tree_of(out) == refs["a"] and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".merged.old-")
    ]
    print(f"\n{KILLS} kills during sharded merges ({seconds * 1e3:.0f} ms each): OUT held {dict(seen)}")


def test_a_save_killed_before_each_of_its_steps_leaves_one_complete_adapter(saved, tmp_path):
    """SIGKILL just before the k-th fsync / rename / rmtree of a save, for every k."""
    model, refs = saved
    target = tmp_path / "ad"
    reader = tiny_llama()
    states = []
    for k in range(1, 50):
        al.save(model, target, name="a")

        def work(k=k):
            calls = 0

            def step(real):
                def run(*args, **kwargs):
                    nonlocal calls
                    calls += 1
                    if calls == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                return run

            os.fsync, os.rename, shutil.rmtree = step(os.fsync), step(os.rename), step(shutil.rmtree)
            al.save(model, target, name="b")

        killed = exit_code(fork(work)) == -signal.SIGKILL
        states.append(state_after_kill(target, refs, reader))
        al.save(model, target, name="a")
        assert leftovers(target) == [] and which(target, refs) == "a"
        if not killed:  # k is past the last step: the save completed
            assert states[-1] == "b"
            break
    assert "between renames" in states and states[0] == "a"
    print(f"\nkilled before each of {len(states) - 1} steps: {states}")


def test_load_between_the_two_renames_names_the_old_copy_and_the_next_save_restores_it(saved, tmp_path):
    model, refs = saved
    target = tmp_path / "ad"
    al.save(model, target, name="a")
    os.rename(target, tmp_path / ".ad.old-12345678")  # what a kill between the renames leaves
    (tmp_path / ".ad.tmp-abc").mkdir()
    with pytest.raises(al.AdapterFileError, match=r"\.ad\.old-\*.*next al.save to this path puts it back"):
        al.load(tiny_llama(), target)
    al.save(model, target, name="b")
    assert leftovers(target) == [] and which(target, refs) == "b"


# -- 5. concurrency --------------------------------------------------------------------------------
def test_two_processes_saving_to_one_directory_leave_one_complete_adapter(saved, tmp_path):
    """Two writers (a and b, CONCURRENT_SAVES saves each) and a reader in this process that reads
    the directory as fast as it can meanwhile: every read is one complete adapter."""
    model, refs = saved
    target = tmp_path / "shared" / "ad"
    al.save(model, target, name="a")
    expected = {name: io.read_adapter(al.save(model, tmp_path / name, name=name))[1] for name in "ab"}
    go_read, go_write = os.pipe()

    def writer(name):
        def work():
            os.close(go_write)
            os.read(go_read, 1)
            for _ in range(CONCURRENT_SAVES):
                al.save(model, target, name=name)

        return work

    running = {fork(writer(name)): name for name in "ab"}
    os.close(go_read)
    os.write(go_write, b"go")
    reads, codes, deadline = Counter(), {}, time.monotonic() + 60 + CONCURRENT_SAVES
    while len(codes) < len(running):
        assert time.monotonic() < deadline, "the writers hung"
        _, tensors = io.read_adapter(target)
        got = [
            name
            for name, want in expected.items()
            if want.keys() == tensors.keys() and all(torch.equal(want[k], tensors[k]) for k in want)
        ]
        assert len(got) == 1
        reads[got[0]] += 1
        for pid in set(running) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
    os.close(go_write)
    assert sorted(codes.values()) == [0, 0]  # no save raised
    assert leftovers(target) == []
    winner = which(target, refs)
    al.load(tiny_llama(), target)
    print(
        f"\n2 processes x {CONCURRENT_SAVES} saves: the directory holds {winner!r}; "
        f"{sum(reads.values())} concurrent reads, each one complete adapter: {dict(reads)}"
    )


def test_a_save_and_a_read_wait_for_a_save_in_progress(saved, tmp_path):
    """The lock in action: while a child's save is held (paused) inside the lock, this process's
    read and save wait for it, so the last save to start is the one that stays."""
    model, refs = saved
    target = tmp_path / "ad"
    al.save(model, target, name="a")
    inside, signal_inside = os.pipe()

    def work():
        os.close(inside)
        from adapterlab.files import atomic

        swap_in = atomic.swap_in

        def slow(*args):
            os.write(signal_inside, b".")
            time.sleep(0.5)
            swap_in(*args)

        atomic.swap_in = slow
        al.save(model, target, name="b")

    pid = fork(work)
    os.close(signal_inside)
    assert read_byte(inside) == b"."
    start = time.perf_counter()
    block, _ = io.read_adapter(target)
    waited = time.perf_counter() - start
    assert block["method"] == "sft" and waited > 0.2  # the read saw the child's save, after waiting
    al.save(model, target, name="a")
    assert exit_code(pid) == 0 and which(target, refs) == "a" and leftovers(target) == []


# -- 3. numerical safety ---------------------------------------------------------------------------
def bits(model: torch.nn.Module) -> dict[str, bytes]:
    """Every state tensor's bytes (NaN-safe, dtype-exact)."""
    return {
        k: (str(v.dtype), v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "overflow"])
def test_safe_merge_refuses_nan_and_inf_and_writes_nothing(bad):
    model = al.inject(tiny_llama(), "lora", r=2)
    randomize_lora(model)
    layer = model.model.layers[1].mlp.down_proj.deltas["default"]
    with torch.no_grad():
        if bad == "overflow":  # finite factors whose product is inf in fp32
            layer.lora_A.weight.fill_(1e30), layer.lora_B.weight.fill_(1e30)
        else:
            layer.lora_B.weight[0, 0] = bad
    before = bits(model)
    with pytest.raises(al.MergeError, match=r"down_proj.*NaN/Inf; nothing was merged"):
        al.merge(model)
    assert bits(model) == before and not any(layer.merged for _, layer in al.model.adapter_layers(model))
    al.merge(model, safe=False)  # the escape hatch does merge
    assert not torch.isfinite(model.model.layers[1].mlp.down_proj.weight).all()


def test_1000_merge_unmerge_cycles_in_fp32_drift_below_1e_5():
    model = al.inject(tiny_llama(layers=1), "lora", r=4, name="a", targets=["q_proj", "down_proj"])
    al.inject(model, "lora", r=2, name="b", targets=["q_proj"])
    randomize_lora(model, std=0.2)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for _ in range(CYCLES):
        al.merge(model)
        al.unmerge(model)
    params = dict(model.named_parameters())
    drift = max((params[n] - w).abs().max().item() for n, w in base.items())
    scale = max(w.abs().max().item() for w in base.values())
    assert drift < 1e-5
    print(f"\n{CYCLES} merge/unmerge cycles, fp32, |W| <= {scale:.3f}: max drift {drift:.3e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_1000_merge_unmerge_cycles_in_half_precision_are_bit_exact(dtype):
    model = al.inject(tiny_llama(layers=1).to(dtype), "lora", r=4, targets=["q_proj", "down_proj"])
    randomize_lora(model, std=0.2)
    al.inject(model, "sft", name="s", targets=["o_proj"])
    for module in model.modules():
        if isinstance(module, al.SparseDelta):
            module.set_support(
                torch.arange(0, module.numel, 7), torch.full((len(range(0, module.numel, 7)),), 0.3)
            )
    before = bits(model)
    al.merge(model)
    assert bits(model) != before  # merging does change the weights
    al.unmerge(model)
    for _ in range(CYCLES - 1):
        al.merge(model)
        al.unmerge(model)
    assert bits(model) == before


# -- 4. atomic model changes -----------------------------------------------------------------------
IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def snapshot(model: torch.nn.Module) -> tuple:
    """Everything an error must not change: tensors (bitwise), module tree, requires_grad, the
    adapter, active and merged sets, and the output."""
    layers = [layer for _, layer in al.model.adapter_layers(model)]
    with torch.no_grad():
        out = model(input_ids=IDS).logits if hasattr(model, "lm_head") else None
    return (
        bits(model),
        [(n, type(m).__name__) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        {n: repr(c) for n, c in al.adapters(model).items()},
        al.active(model),
        [(dict(layer.merged), layer.disabled, layer.routes) for layer in layers],
        None if out is None else out.reshape(-1).view(torch.uint8).numpy().tobytes(),
    )


def lora_model() -> torch.nn.Module:
    model = al.inject(tiny_llama(), "lora", name="a", r=2)
    al.inject(model, "lora", name="b", r=2, targets=["v_proj", "o_proj"])  # not on the first modules
    randomize_lora(model)
    return model


def poison(model, adapter="a"):
    """A NaN in the last module the adapter touches (merge must check before writing the first)."""
    name = [n for n, _ in model.named_parameters() if f"deltas.{adapter}.lora_B" in n][-1]
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("nan")


def saved_dir(model, tmp, name="a", edit=None):
    directory = al.save(model, tmp / f"saved-{name}", name=name)
    if edit:
        edit(directory)
    return directory


def truncate(directory):
    w = directory / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-10])


def bad_last_tensor(directory):
    tensors, meta = read_weights(directory / WEIGHTS_FILE)
    last = max(tensors)
    tensors[last] = torch.zeros(tensors[last].shape[0], 3)
    save_file(tensors, directory / WEIGHTS_FILE, metadata=meta)


def unsorted_indices(directory):
    tensors, meta = read_weights(directory / WEIGHTS_FILE)
    last = max(k for k in tensors if k.endswith("indices"))
    tensors[last] = tensors[last].flip(0)
    save_file(tensors, directory / WEIGHTS_FILE, metadata=meta)


def wide_llama_dir(tmp):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return al.save(al.inject(wide, "lora", r=2), tmp / "wide")


def sft_dir(tmp):
    model = two_adapters()
    return al.save(model, tmp / "sft", name="b")


def bad_routing(model):
    with al.routing(model, ["a"]):  # one id for a batch of two
        model(input_ids=IDS)


def levi_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    backbone = BertForSequenceClassification(
        BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
        )
    )
    return al.levi.LEVI(backbone, num_classes=3)


# (id, build the model, set up (model, tmp) -> argument, the failing call (model, argument), error)
ERROR_CASES = [
    (
        "inject: target matches nothing",
        lora_model,
        None,
        lambda m, _: al.inject(m, "lora", name="c", targets=["nope"]),
        al.TargetError,
    ),
    (
        "inject: one target unsupported",
        lora_model,
        None,
        lambda m, _: al.inject(m, "lora", name="c", targets=["q_proj", "input_layernorm"]),
        al.UnsupportedModuleError,
    ),
    (
        "inject: bad option value",
        lora_model,
        None,
        lambda m, _: al.inject(m, "lora", name="c", r=0),
        al.ConfigError,
    ),
    (
        "inject: unknown option",
        lora_model,
        None,
        lambda m, _: al.inject(m, "lora", name="c", rank=4),
        al.ConfigError,
    ),
    (
        "inject: name taken",
        lora_model,
        None,
        lambda m, _: al.inject(m, "lora", name="a"),
        al.AdapterNameError,
    ),
    (
        "load: wrong model",
        lora_model,
        lambda m, t: wide_llama_dir(t),
        lambda m, d: al.load(m, d, name="c"),
        al.FingerprintMismatchError,
    ),
    (
        "load: corrupted file",
        lora_model,
        lambda m, t: saved_dir(m, t, edit=truncate),
        lambda m, d: al.load(m, d, name="c"),
        al.AdapterFileError,
    ),
    (
        "load: last tensor misfits",
        lora_model,
        lambda m, t: saved_dir(m, t, edit=bad_last_tensor),
        lambda m, d: al.load(m, d, name="c"),
        al.AdapterFileError,
    ),
    (
        "load: sparse indices unsorted",
        lora_model,
        lambda m, t: saved_dir(two_adapters(), t, "b", unsorted_indices),
        lambda m, d: al.load(m, d, name="c"),
        al.AdapterFileError,
    ),
    (
        "load: name taken",
        lora_model,
        lambda m, t: sft_dir(t),
        lambda m, d: al.load(m, d, name="a"),
        al.AdapterNameError,
    ),
    (
        "combine: unknown adapter",
        lora_model,
        None,
        lambda m, _: al.combine(m, {"a": 1.0, "zzz": 1.0}),
        al.AdapterNameError,
    ),
    (
        "combine: bad how",
        lora_model,
        None,
        lambda m, _: al.combine(m, {"a": 1.0, "b": 1.0}, how="nope"),
        al.ConfigError,
    ),
    (
        "combine: into a taken name",
        lora_model,
        None,
        lambda m, _: al.combine(m, {"b": 1.0}, into="a"),
        al.AdapterNameError,
    ),
    (
        "combine: different targets",
        lora_model,
        None,
        lambda m, _: al.combine(m, {"a": 1.0, "b": 1.0}),
        al.UnsupportedModuleError,
    ),
    ("merge: NaN", lora_model, lambda m, t: poison(m), lambda m, _: al.merge(m), al.MergeError),
    ("merge: already merged", lora_model, lambda m, t: al.merge(m), lambda m, _: al.merge(m), al.MergeError),
    (
        "merge: one merged, one not",
        lora_model,
        lambda m, t: al.merge(m, ["b"]),
        lambda m, _: al.merge(m),
        al.MergeError,
    ),
    ("merge: unknown name", lora_model, None, lambda m, _: al.merge(m, ["zzz"]), al.AdapterNameError),
    (
        "merge: inactive name",
        lora_model,
        lambda m, t: al.set_active(m, ["a"]),
        lambda m, _: al.merge(m, ["a", "b"]),
        al.MergeError,
    ),
    ("delete: unknown name", lora_model, None, lambda m, _: al.delete(m, "zzz"), al.AdapterNameError),
    ("delete: merged", lora_model, lambda m, t: al.merge(m), lambda m, _: al.delete(m, "a"), al.MergeError),
    (
        "set_active: unknown",
        lora_model,
        None,
        lambda m, _: al.set_active(m, ["a", "zzz"]),
        al.AdapterNameError,
    ),
    (
        "set_active: bad weight",
        lora_model,
        lambda m, t: al.set_active(m, ["b"]),
        lambda m, _: al.set_active(m, {"a": 1.0, "b": "x"}),
        al.ConfigError,
    ),
    (
        "set_active: NaN weight",
        lora_model,
        None,
        lambda m, _: al.set_active(m, {"a": float("nan")}),
        al.ConfigError,
    ),
    (
        "set_active: while merged",
        lora_model,
        lambda m, t: al.merge(m),
        lambda m, _: al.set_active(m, ["a"]),
        al.MergeError,
    ),
    ("routing: ids length", lora_model, None, lambda m, _: bad_routing(m), al.RoutingError),
    (
        "routing: unknown adapter",
        lora_model,
        None,
        lambda m, _: al.routing(m, ["zzz", None]).__enter__(),
        al.AdapterNameError,
    ),
    (
        "routing: id not a name",
        lora_model,
        None,
        lambda m, _: al.routing(m, ["a", 3]).__enter__(),
        al.AdapterNameError,
    ),
    (
        "routing: while merged",
        lora_model,
        lambda m, t: al.merge(m),
        lambda m, _: al.routing(m, ["a", None]).__enter__(),
        al.MergeError,
    ),
    (
        "unload(merge=True): NaN",
        lora_model,
        lambda m, t: poison(m, "b"),
        lambda m, _: al.unload(m, merge=True),
        al.MergeError,
    ),
    ("unload(merge=True): LEVI", levi_model, None, lambda m, _: al.unload(m, merge=True), al.MergeError),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_a_failing_call_leaves_the_model_unchanged(case, tmp_path):
    _, build, setup, call, error = case
    model = build()
    argument = setup(model, tmp_path) if setup else None
    before = snapshot(model)
    with pytest.raises(error):
        call(model, argument)
    assert snapshot(model) == before
