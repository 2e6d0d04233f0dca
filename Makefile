# One entry point for every task; .ci/run and people call the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TRANSPORT ?=
DELIVERIES ?= 200
PYTEST_ARGS ?=

CHAOS_DELIVERIES ?= 2000
CHAOS_CONFIGURATIONS ?= sqlite nats
CHAOS_ARGS ?=

.PHONY: demo test lint format bench chaos services install clean docs mutate

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

## demo: the drone delivery end to end on the embedded bus (TRANSPORT=nats://127.0.0.1:4222 etc.)
demo: $(STAMP)
	$(BIN)/choreograph demo --deliveries $(DELIVERIES) $(if $(TRANSPORT),--transport '$(TRANSPORT)')

## test: the whole suite; broker tests skip locally when a server is down, fail under CI=true.
## The Node.js tools' npm packages are installed first (from their lock files) when npm is there.
test: $(STAMP)
	@bash scripts/node-tools.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## docs: the documentation site into site/ (MkDocs), warnings as errors; nothing fetched
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check choreograph examples tests benchmarks chaos
	$(BIN)/ruff format --check choreograph examples tests benchmarks chaos
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format choreograph examples tests benchmarks chaos
	$(BIN)/ruff check --fix choreograph examples tests benchmarks chaos

## mutate: mutation testing of the core modules against the tests that need no broker; prints
## the score per module (docs/testing.md). Slow (about an hour on 2 cores); not part of CI.
## MUTANTS="choreograph.retry*" runs some only; results are kept in mutants/ between runs.
MUTATE_CHILDREN ?= 4
MUTANTS ?=
mutate: $(STAMP)
	$(BIN)/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTANTS)
	$(BIN)/python scripts/mutation_score.py --min 85

## bench: the workloads of the benchmark book, each beside its raw-client baseline
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## chaos: the drone delivery under faults (SIGKILLs, poison, NATS node kills), each configuration;
## non-zero exit on any loss, double effect, held resource, stall or crash (docs/reliability.md)
chaos: $(STAMP)
	@for c in $(CHAOS_CONFIGURATIONS); do \
		$(BIN)/python -m chaos --configuration $$c --deliveries $(CHAOS_DELIVERIES) $(CHAOS_ARGS) \
			|| exit 1; \
	done

## services: start the brokers and PostgreSQL on this machine when they are not running
services:
	bash scripts/start-services.sh

clean:
	rm -rf $(VENV) .choreograph .pytest_cache .mypy_cache .ruff_cache
