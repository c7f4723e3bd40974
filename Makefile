# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv once and reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint typecheck format bench install clean deploy-local

install: $(STAMP)

# Reinstalls only when pyproject.toml changes (the stamp is newer otherwise).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The resolver of old pips (23.x) backtracks for many minutes over prefect/ray; 25+ resolves in seconds.
	$(PY) -m pip install -q --disable-pip-version-check "pip>=25"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/catalog-tagger demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check catalog_tagger flows tests bench
	$(VENV)/bin/ruff format --check catalog_tagger flows tests bench

# mypy over the library; strict on model/, tag/ and train/ (pyproject [tool.mypy]).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format catalog_tagger flows tests bench
	$(VENV)/bin/ruff check --fix catalog_tagger flows tests bench

# Local Prefect server + process work pool + the deployments of deploy/prefect.yaml + a worker (Ctrl-C stops them).
deploy-local: $(STAMP)
	bash deploy/local.sh

bench: $(STAMP)
	$(PY) -m bench.run
	$(PY) -m bench.latest_merge
	$(PY) -m bench.plan
	$(PY) -m bench.writer

clean:
	rm -rf demo-out .pytest_cache bench/results
