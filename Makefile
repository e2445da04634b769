# One entry point for users and CI. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo toy test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The main job: the whole pipeline (curate, cache, train with 2 torchrun processes, export, evaluate) under
# kfp.local on the tiny preset; it prints where the report is.
demo: venv
	$(VENV)/bin/distar run-local --preset tiny --root runs/pipeline

toy: venv
	$(VENV)/bin/distar toy --out runs/demo-toy
	@echo "picture: runs/demo-toy/toy.png   metrics: runs/demo-toy/metrics.json"

# Everything CI runs: tests/unit (math, parsing, converters, bad input) and tests/integration (torchrun, the DAG,
# emulated object stores and API servers).
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit layer alone: a few minutes, for the edit-test loop.
test-fast: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Style, formatting, and the layer contract of docs/ARCHITECTURE.md (pyproject.toml [tool.importlinter]).
lint: venv
	$(VENV)/bin/ruff check src tests components pipelines benchmarks
	$(VENV)/bin/ruff format --check src tests components pipelines benchmarks
	$(VENV)/bin/lint-imports

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
