"""`adapterlab --help` starts without torch: the package is lazy and each command imports what it
runs when it runs (the wall time is a benchmark, docs/benchmarks.md, not a test)."""

import subprocess
import sys

import pytest

from adapterlab import arithmetic, cli

PROBE = """
import sys
from adapterlab.cli import main
try:
    code = main({args!r})
except SystemExit as e:
    code = e.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["merge", "--help"], ["combine", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    run = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "NO-TORCH 0", run.stdout[-2000:]


def test_a_command_that_needs_torch_still_gets_it(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=["inspect", str(tmp_path / "missing")])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "adapterlab: error:" in run.stderr and run.stdout.strip().endswith("TORCH 1"), (
        run.stdout + run.stderr
    )


def test_merge_hows_written_out_in_the_cli_equal_the_arithmetic():
    assert cli.MERGE_HOWS == arithmetic.TENSOR_HOWS
