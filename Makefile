# Two commands on a fresh machine: `make demo` (the main job on the embedded stack) and
# `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DATA_MIRROR
export VTM_HOME ?= $(CURDIR)/.local

.PHONY: venv browser demo up down test test-fast lint bench pools clean deploy-env cluster

venv: $(STAMP)

# Reinstalled only when a requirements file changes. The constraints file pins every transitive
# package, so two machines get the same environment.
$(STAMP): requirements-airflow.txt requirements-dev.txt constraints-airflow.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-airflow.txt -r requirements-dev.txt \
		-c constraints-airflow.txt
	$(BIN)/python -m pip check
	touch $@

# A headless Chromium for the browser test (tests/e2e/test_approval.py::test_approve_in_a_real_browser_promotes): pinned Debian
# packages, sha256-checked, unpacked into $(VENV)/browser by tools/browser.py (~105 MB, no root).
browser: $(VENV)/browser/.installed

$(VENV)/browser/.installed: tools/browser.py | $(STAMP)
	$(BIN)/python tools/browser.py install

up: venv
	tools/stack.sh up

demo: up
	eval "$$(tools/stack.sh env)" && $(BIN)/python tools/demo.py

down:
	tools/stack.sh down

# Two workers (pytest-xdist), each taking a whole test module at a time, heaviest first
# (tests/conftest.py orders them): the e2e stacks mostly wait on each other's processes, so two
# fit 2 cores. It ends with the 15 slowest tests and the suite's wall time: the budget is 25
# minutes of pytest (docs/performance.md, "The test suite").
test: venv lint browser
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

test-fast: venv
	$(BIN)/python -m pytest -m "not e2e"

# ruff, then the layers of dags/ (pyproject.toml [tool.importlinter]; docs/architecture.md).
lint: venv
	$(BIN)/ruff check dags tests tools bench
	cd dags && PYTHONPATH=. ../$(BIN)/lint-imports --no-cache ../pyproject.toml

bench: venv
	$(BIN)/python bench/power_bench.py
	$(BIN)/python bench/image_bench.py
	$(BIN)/python bench/tick_bench.py

pools:
	@$(PYTHON) dags/common/config.py pools

# Distributed deployment (docs/deployment.md): .env with generated secrets for
# docker-compose-mlops.yml, and the same Celery layout as local processes (no Docker).
deploy-env:
	$(PYTHON) tools/deploy_env.py

cluster: venv
	$(BIN)/python tools/cluster.py up

clean: down
	rm -rf .local
