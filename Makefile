# Every target sets itself up on a fresh machine that has only Python 3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The pinned CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo lint test bench clean

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

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

bench: $(VENV)/.dev
	$(PY) benchmarks/lora_cpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
