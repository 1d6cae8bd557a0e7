"""Adapters under torch.distributed, on CPU with gloo and 2 processes: plain DDP (LoRA, an SFT sparse
adapter, SaRA with its nuclear-norm term), `transformers.Trainer` (plain, and with `AdapterCallback`)
and FSDP2 `fully_shard` (LoRA, SFT, SaRA with its nuclear-norm term; `al.save` on the sharded model). One torchrun launch of `distributed_worker.py` runs all of it,
since starting torchrun and importing transformers in two processes costs most of the time; the
tests below check what rank 0 recorded (see the worker's docstring for the layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_worker import STEPS
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

WORKER = Path(__file__).with_name("distributed_worker.py")
RANK_TOL = 1e-7  # between ranks: they apply the same averaged gradient
SINGLE_TOL = 1e-5  # against one process on the whole batch: only the summation order differs
MOVED = 1e-3  # each run must move its adapter by far more than SINGLE_TOL
PREFIX = "base_model.model."  # al.save's key prefix


def callback_imports() -> bool:
    try:
        from adapterlab.integrations import AdapterCallback  # noqa: F401
    except ImportError:
        return False
    return True


CALLBACK = callback_imports()
CALLBACK_RUNS = ["trainer-callback-lora", "trainer-callback-sara", "trainer-callback-sft"] if CALLBACK else []
SAVED_RUNS = ["ddp-lora", "ddp-sft", "ddp-sara", "fsdp-lora", "fsdp-sft", "fsdp-sara"]
RUNS = SAVED_RUNS + ["trainer-lora"] + CALLBACK_RUNS
needs_callback = pytest.mark.skipif(
    not CALLBACK, reason="adapterlab.integrations.AdapterCallback does not import"
)


@dataclass
class Launch:
    out: Path
    scratch: Path
    tensors: dict[str, Tensor]
    report: dict

    def run(self, run: str, who: str) -> dict[str, Tensor]:
        """The tensors of `run` recorded for `who` (rank0, rank1, single, initial, loaded, …), by `PATH.KEY`."""
        head = f"{run}/{who}/"
        found = {k[len(head) :]: v for k, v in self.tensors.items() if k.startswith(head)}
        assert found, f"the worker recorded nothing for {head!r}"
        return found


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Launch:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out, scratch = tmp_path_factory.mktemp("dist-out"), tmp_path_factory.mktemp("dist-scratch")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(WORKER),
        str(out),
        str(scratch),
        "--fsdp",
    ] + (["--callback"] if CALLBACK else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return Launch(
        out, scratch, load_file(out / "results.safetensors"), json.loads((out / "report.json").read_text())
    )


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest |a − b| over the float tensors (same keys and shapes required)."""
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max(
        (a[k].double() - b[k].double()).abs().max().item()
        for k in a
        if a[k].is_floating_point() and a[k].numel()
    )


def moved(after: dict[str, Tensor], before: dict[str, Tensor]) -> float:
    """How far training moved an adapter: the largest |after − before| over shared float tensors;
    a tensor only `after` has (LT-SFT's sparse values, made from a ΔW that started at 0) counts
    with its magnitude."""
    return max(
        (after[k].double() - before[k].double() if k in before else after[k].double()).abs().max().item()
        for k in after
        if after[k].is_floating_point() and after[k].numel()
    )


def same_integers(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Whether the integer and bool tensors (sparse indices, SaRA's frozen mask) are equal."""
    return all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())


@pytest.mark.parametrize("run", RUNS)
def test_ranks_end_with_identical_adapters(launch, run):
    rank0, rank1 = launch.run(run, "rank0"), launch.run(run, "rank1")
    assert max_diff(rank0, rank1) <= RANK_TOL
    assert same_integers(rank0, rank1)


@pytest.mark.parametrize("run", RUNS)
def test_matches_one_process_on_the_global_batch(launch, run):
    """DDP averages the ranks' gradients of their local mean losses = the gradient of the global mean
    (equal local batches); with SGD a summed or unscaled gradient would miss by about MOVED."""
    single, rank0 = launch.run(run, "single"), launch.run(run, "rank0")
    assert moved(single, launch.run(run, "initial")) >= MOVED
    assert max_diff(rank0, single) <= SINGLE_TOL
    assert same_integers(rank0, single)


def test_sara_nuclear_norm_term_takes_part(launch):
    assert max_diff(launch.run("ddp-sara", "single"), launch.run("ddp-sara", "no-nuclear")) >= MOVED


@pytest.mark.parametrize("run", SAVED_RUNS)
def test_saved_adapter_loads_back_bit_exact(launch, run):
    final, loaded = launch.run(run, "rank0"), launch.run(run, "loaded")
    assert final.keys() == loaded.keys()
    assert all(torch.equal(final[k], loaded[k]) for k in final)


def test_only_rank0_wrote_files(launch):
    """Rank 0 saved each adapter once, into a directory that did not exist, and nothing replaced the
    file afterwards (an `al.save` by the other rank would have swapped in a new inode); nothing else
    appeared in the output directory."""
    saves = launch.report["saves"]
    assert sorted(saves) == sorted(SAVED_RUNS)
    expected = {"results.safetensors", "report.json"}
    for run, save in saves.items():
        assert not save["existed_before"], run
        st = (launch.out / save["dir"] / "adapter_model.safetensors").stat()
        assert (st.st_ino, st.st_mtime_ns) == (save["ino"], save["mtime_ns"]), run
        expected |= {f"{save['dir']}/adapter_model.safetensors", f"{save['dir']}/adapter_config.json"}
    written = {p.relative_to(launch.out).as_posix() for p in launch.out.rglob("*") if p.is_file()}
    assert written == expected


def test_al_save_on_a_fully_sharded_model_is_called_by_every_rank_and_written_by_rank0(launch):
    """Every rank called `al.save` on the FSDP2 model (it gathers, a collective; a rank that skipped
    it would have hung the launch) and got the directory back; the files are rank 0's alone (checked
    by test_only_rank0_wrote_files) and hold the gathered adapter (test_saved_adapter_loads_back)."""
    saves = launch.report["fsdp_save"]
    assert sorted(saves) == ["fsdp-lora", "fsdp-sara", "fsdp-sft"]
    for info in saves.values():
        assert [r["returned"] for r in info["ranks"]] == [info["target"]] * 2
        assert not any(r["existed_before"] for r in info["ranks"])


def test_sara_nuclear_norm_term_takes_part_under_fsdp(launch):
    """fsdp-sara matches the single process trained with the term (test_matches_one_process…),
    which differs from training without it."""
    assert max_diff(launch.run("fsdp-sara", "single"), launch.run("ddp-sara", "no-nuclear")) >= MOVED


@pytest.mark.parametrize("run", ["trainer-lora"] + CALLBACK_RUNS)
def test_trainer_trained_with_ddp(launch, run):
    info = launch.report["trainer"][run]
    assert (info["ddp"], info["world"]) == ("DistributedDataParallel", 2)
    # the Trainer logs the global-batch loss; the single-process replay computed the same losses
    assert info["logged_losses"] == pytest.approx(launch.report["losses"][run], rel=1e-5)


def checkpoint(launch: Launch, run: str) -> Path:
    return launch.scratch / run / f"checkpoint-{STEPS}"


@needs_callback
@pytest.mark.parametrize("run", CALLBACK_RUNS)
def test_callback_checkpoint_is_adapter_only(launch, run):
    with safe_open(checkpoint(launch, run) / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".deltas.default." in k for k in keys)


@needs_callback
@pytest.mark.parametrize("run", ["trainer-callback-lora", "trainer-callback-sara"])
def test_callback_checkpoint_holds_the_final_adapter(launch, run):
    """(LT-SFT's checkpoint holds the phased ΔW; the callback turns it sparse after the last save.)"""
    saved = load_file(checkpoint(launch, run) / "adapter_model.safetensors")
    final = launch.run(run, "rank0")
    assert {k.removeprefix(PREFIX) for k in saved} == final.keys()
    assert all(torch.equal(saved[PREFIX + k], final[k]) for k in final)


@needs_callback
def test_callback_ran_sara_reselection(launch):
    """The re-selection after step 1 froze some entries (equal on both ranks and to the single
    process: checked with the other integer tensors above)."""
    frozen = [t for k, t in launch.run("trainer-callback-sara", "rank0").items() if k.endswith(".frozen")]
    assert frozen and any(bool(t.any()) for t in frozen)


@needs_callback
def test_callback_switched_lt_sft_to_its_sparse_phase(launch):
    """After step 0 the top-K support was chosen; at the end the adapter is plain sparse deltas."""
    final = launch.run("trainer-callback-sft", "rank0")
    assert final and all(k.endswith((".indices", ".values")) for k in final)
    k = sum(t.numel() for key, t in final.items() if key.endswith(".indices"))
    maskable = sum(
        t.numel()
        for key, t in launch.run("trainer-callback-sft", "initial").items()
        if key.endswith(".weight_delta")
    )
    assert k == round(0.05 * maskable)  # density=0.05 in the worker
