# One command runs the system, one runs the tests; both install what they need.
PY := .venv/bin/python
BIN := .venv/bin
# make bench: the bare chord and both joins of the saga, each on its own stack, one report.
BENCH_ARGS ?= --saga-join both

.PHONY: run test check lint typecheck imports unit integration e2e chaos bench install clean

run: install            ## The whole system locally: PostgreSQL, Redis, API, worker, beat, Flower
	$(PY) -m scripts.run

test: install check     ## Static checks, then every test (real PostgreSQL, Redis, workers)
	$(PY) -m pytest

check: lint typecheck imports

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

imports: install        ## Imports point one way: config <- sagas <- orders <- workers
	$(BIN)/lint-imports

unit: install
	$(PY) -m pytest tests/unit

integration: install
	$(PY) -m pytest tests/integration

e2e: install
	$(PY) -m pytest tests/e2e

chaos: install          ## The full soak: 2000 orders, a fault every few seconds, every invariant
	$(PY) -m tests.chaos.soak $(CHAOS_ARGS)

bench: install          ## Saga vs bare chord throughput and latency; writes bench/results/
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(PY) -m bench.run $(BENCH_ARGS)

install:
	@scripts/bootstrap.sh

clean:
	rm -rf .run .venv .mypy_cache .pytest_cache .ruff_cache
