# Two entry points for a fresh machine: `make repro` and `make test`.
# Both create .venv if missing and (re)install when pyproject.toml or requirements.lock changes.
# Every package comes from requirements.lock, pinned and hash-checked; `make lock` regenerates it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2

.PHONY: install repro test bench clean-venv lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import sys; sys.exit(None if sys.version_info[:2] == (3, 11) else "requirements.lock is for Python 3.11, not " + sys.version.split()[0])'
	$(PY) -m pip install --quiet "pip==$(PIP_VERSION)"
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# regenerate requirements.lock from pyproject.toml (UPGRADE=1: newer releases within its ranges)
lock:
	test -x .lock-venv/bin/pip-compile || ($(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet "pip-tools==$(PIP_TOOLS_VERSION)")
	.lock-venv/bin/pip-compile --quiet --allow-unsafe --extra=dev --generate-hashes --no-emit-index-url \
		--no-emit-find-links --strip-extras --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) \
		--output-file=requirements.lock pyproject.toml

install: $(STAMP)

# dvc runs each stage's `python ...` from PATH: put the venv first
repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: $(STAMP)
	$(PY) -m pytest --durations=25

bench: $(STAMP)
	$(PY) -m bench

# a smoke run of every benchmark on small sizes (figures not for quoting)
.PHONY: bench-quick bench-gpu-deps bench-real
bench-quick: $(STAMP)
	$(PY) -m bench --quick

# the default pipeline on real photos (Fashion-MNIST, apt package dataset-fashion-mnist) at two folder sizes
bench-real: $(STAMP)
	$(PY) -m bench.real_data

# packages the GPU machine lacks, for the device call's carry (docs/benchmarks.md)
bench-gpu-deps: $(STAMP)
	$(PY) -m bench.gpu_deps

clean-venv:
	rm -rf $(VENV)

# the paper's strategy table as DVC experiments (docs/comparing-strategies.md)
.PHONY: compare
compare: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m stages.compare

# the same strategy table on real photos (Fashion-MNIST, 500 per class; bench/comparison_real.py)
.PHONY: compare-real
compare-real: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m bench.comparison_real
