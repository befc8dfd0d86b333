# Two commands for a new user: `make run` and `make test`. Each creates .venv and installs the
# package with what it needs; PostgreSQL comes from DATABASE_URL / TEST_DATABASE_URL when set,
# else from an embedded cluster in .data/ (no root, no Docker, no running server needed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench schemas clean distclean db-stop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/exportlog run

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check schemas services tests bench deploy
	$(BIN)/ruff format --check schemas services tests bench deploy

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Every benchmark next to its raw baseline, in under 10 minutes on 2 cores; tables, plots and
# one summary table (summary.md) in bench/results/. BENCH_ARGS="--quick" or "--only fanout".
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

schemas: $(STAMP)
	$(BIN)/python -m schemas.jsonschema
	$(BIN)/python -m schemas.asyncapi
	$(BIN)/python -m services.export.openapi

db-stop: $(STAMP)
	$(BIN)/exportlog db stop

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache bench/results

distclean: clean
	-$(BIN)/exportlog db stop
	rm -rf $(VENV) .data
