# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build by default; a GPU user sets e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test test-fast lint format install install-test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tuneforge demo

# Lint and format checks first (seconds): a style slip fails fast, before minutes of tests.
lint: install
	$(VENV)/bin/ruff check tuneforge tests benchmarks
	$(VENV)/bin/ruff format --check tuneforge tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix tuneforge tests benchmarks
	$(VENV)/bin/ruff format tuneforge tests benchmarks

test: lint
	$(PY) -m pytest -q

# The same suite without the end-to-end tests marked slow (minutes of training, real replica processes).
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
