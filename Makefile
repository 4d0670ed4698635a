# Two entry points for a fresh machine: `make repro` and `make test`.
# Both create .venv if missing and (re)install when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install repro test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# dvc runs each stage's `python ...` from PATH: put the venv first
repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench

# a smoke run of every benchmark on small sizes (figures not for quoting)
.PHONY: bench-quick bench-gpu-deps
bench-quick: $(STAMP)
	$(PY) -m bench --quick

# packages the GPU machine lacks, for the device call's carry (README, Benchmarks)
bench-gpu-deps: $(STAMP)
	$(PY) -m bench.gpu_deps

clean-venv:
	rm -rf $(VENV)

# the paper's strategy table as DVC experiments (README "Comparing masking strategies")
.PHONY: compare
compare: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m stages.compare
