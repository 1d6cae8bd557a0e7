# Every target sets itself up on a fresh machine that has only Python 3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The pinned CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo lint typecheck docs test bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/adapterlab demo

# Style first: a lint or format failure is reported in seconds, before the tests.
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Types: strict on the public API and the core, default checks elsewhere ([tool.mypy] in pyproject.toml).
typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

# The docs site with its API reference, into site/; --strict fails on a broken link or reference.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

bench: $(VENV)/.dev
	$(PY) benchmarks/lora_cpu.py

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .mypy_cache
