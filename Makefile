# One entry point for users and CI. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The one torch every environment runs: this venv, CI, both images (locks/, written by `make lock`; a test holds
# the Dockerfiles, this file and the locks to it). The CPU wheel is installed first: a bare `torch` requirement
# would pull a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
TORCH_CPU ?= torch==$(TORCH_VERSION)
# Where `make lock` finds torch's CPU build: PyTorch's flat page of wheels, or a local folder of them.
TORCH_CPU_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
# The images' platform (python:3.11-slim-bookworm on x86_64).
LOCK := $(VENV)/bin/uv pip compile pyproject.toml --quiet --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

.PHONY: venv lock browser demo toy lab test test-fast lint bench screenshots clean

# The versions come from locks/ci.txt (torch, installed first, is the only requirement it leaves out).
# locks/nodeps.txt: test references installed without their declared dependencies (see the file).
$(VENV)/.installed: pyproject.toml locks/ci.txt locks/nodeps.txt
	@echo "make: installing distar, CPU torch and the pinned dependencies into $(VENV) (once; under 4 minutes on 2 CPU cores)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -r locks/ci.txt
	$(PY) -m pip install -q --no-deps -r locks/nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Rewrites the three locks from pyproject.toml, keeping every version already locked that still fits: CI's
# (the test and storage extras, torch left to TORCH_CPU), the CPU image's and the CUDA image's (PyPI's CUDA build
# of torch, with the NVIDIA libraries it pins). `uv pip compile --upgrade-package NAME` moves one.
lock: venv
	$(PY) -m pip install -q uv
	echo "torch==$(TORCH_VERSION)+cpu" > $(VENV)/torch-cpu.txt
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-cuda.txt
	$(LOCK) --extra test --extra storage -c $(VENV)/torch-cpu.txt --find-links $(TORCH_CPU_LINKS) \
		--no-emit-package torch -o locks/ci.txt
	$(LOCK) --extra storage -c $(VENV)/torch-cpu.txt --find-links $(TORCH_CPU_LINKS) -o locks/cpu.txt
	$(LOCK) --extra storage -c $(VENV)/torch-cuda.txt -o locks/cuda.txt

# The main job: the whole pipeline (curate, cache, train with 2 torchrun processes, export, evaluate) under
# kfp.local on the tiny preset; it prints where the report is.
demo: venv
	$(VENV)/bin/distar run-local --preset tiny --root runs/pipeline

toy: venv
	$(VENV)/bin/distar toy --out runs/demo-toy
	@echo "picture: runs/demo-toy/toy.png   metrics: runs/demo-toy/metrics.json"

# The real-data lab (docs/LAB.md): every stage on scikit-learn's digits, the paper's ablation grid, the comparison.
# About an hour on 2 CPU cores (docs/LAB.md); LAB_ARGS=--quick is the 1-minute version CI runs.
lab: venv
	@$(PY) -c "import sklearn" 2>/dev/null || $(PY) -m pip install -q "scikit-learn>=1.4"
	$(VENV)/bin/distar lab digits --out runs/lab $(LAB_ARGS)

# Everything CI runs: tests/unit (math, parsing, converters, bad input) and tests/integration (torchrun, the DAG,
# emulated object stores and API servers, the reports in headless Chromium as the pipeline UI shows them).
test: venv browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian's Chromium, for the tests that open the HTML reports in a sandboxed iframe.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		{ echo "make test needs Chromium (Debian: apt-get install chromium)"; exit 1; }

# The unit layer alone: a few minutes, for the edit-test loop.
test-fast: venv browser
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Style, formatting, and the layer contract of docs/ARCHITECTURE.md (pyproject.toml [tool.importlinter]).
lint: venv
	$(VENV)/bin/ruff check src tests components pipelines benchmarks
	$(VENV)/bin/ruff format --check src tests components pipelines benchmarks
	$(VENV)/bin/lint-imports

# docs/screenshots/: the reports as the tests render them in the pipeline UI's 600 px frame (docs/REPORTS.md).
screenshots: venv browser
	DISTAR_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q tests/integration/test_pipeline.py \
		tests/integration/test_ablation.py "tests/integration/test_evaluate.py::test_metrics_per_prompt_scores_resume_and_report"

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
