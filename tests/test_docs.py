"""The API reference covers the public API: every name `import adapterlab as al` exports is
rendered in docs/api.md (the strict mkdocs build in CI checks that each reference resolves)."""

import re
from pathlib import Path

import adapterlab as al

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_export_is_in_the_api_reference():
    page = API_PAGE.read_text()
    rendered = set(re.findall(r"^::: adapterlab\.([\w.]+)", page, re.M))
    rendered |= set(re.findall(r"^\s+- (\w+)$", page, re.M))  # members listed under a module
    missing = [
        name
        for name in al.__all__
        if name != "__version__"
        and name not in rendered
        and not any(r.startswith(f"{name}.") for r in rendered)
    ]
    assert not missing, f"exported but not in docs/api.md: {missing}"


def test_lazy_exports_are_the_objects_of_their_modules():
    """`import adapterlab` is lazy: whatever order names are first used in, each is the object its
    module defines (al.hotswap the function, though importing it creates the submodule hotswap)."""
    import subprocess
    import sys

    probe = (
        "import adapterlab as al, inspect\n"
        "al.prepare_hotswap\n"
        "print(all(not inspect.ismodule(getattr(al, n)) for n in al._LAZY), callable(al.hotswap),"
        " all(hasattr(al, n) for n in al.__all__))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().splitlines()[-1] == "True True True", run.stdout + run.stderr[-2000:]
