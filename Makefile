# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit integration faults bench up down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# setuptools prints an InformationOnly notice on every editable install (its "be careful
	@# with folders named like your package"); the layout is flat on purpose, so it is hidden
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e '.[dev,all]'
	@touch $(STAMP)

demo: setup
	$(BIN)/agentfabric demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

unit: setup
	$(BIN)/python -m pytest tests/unit

integration: setup
	$(BIN)/python -m pytest tests/integration

faults: setup  # the fault suite (kill -9, Redis and service outages, fuzz); prints figures
	AF_FAULTS=1 $(BIN)/python -m pytest tests/faults -s -v

bench: setup  # BENCH_ARGS=--quick for a ~1 min smoke run; see python -m bench.suite --help
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.suite $(BENCH_ARGS)

up: setup
	$(BIN)/agentfabric up

down: setup
	$(BIN)/agentfabric down

clean:
	-$(BIN)/agentfabric down
	rm -rf $(VENV) .agentfabric .mypy_cache .ruff_cache .pytest_cache *.egg-info
