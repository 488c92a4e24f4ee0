# Soko: `make run` serves a working marketplace; `make test` runs every check.
# Needs only Python 3.11+; the pinned uv below is bootstrapped into .tools/ on first use.

PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.DEFAULT_GOAL := help
.PHONY: help install run serve worker migrate test check lint format typecheck pytest \
        test-sqlite bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Soko needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(BIN)/soko: $(UV) pyproject.toml uv.lock
	$(UV) sync --locked --all-extras --python $(PYTHON)
	@touch $@

install: $(BIN)/soko  ## Create .venv and install Soko with every extra and the dev tools

run: install  ## Migrate, seed a new database with the demo marketplace, serve on http://127.0.0.1:8000
	$(BIN)/soko migrate upgrade
	$(BIN)/soko seed demo --if-empty --if-enabled
	$(BIN)/soko serve

worker: install  ## Run a separate outbox worker (when SOKO_OUTBOX_DISPATCH=worker)
	$(BIN)/soko worker

migrate: install  ## Apply database migrations
	$(BIN)/soko migrate upgrade

test: install lint typecheck pytest  ## Lint, type-check, and run every test (SQLite, then PostgreSQL and Redis when reachable)

check: test  ## Same as test

lint: install  ## Ruff, formatting, and the architecture contracts
	$(BIN)/ruff check src tests bench migrations
	$(BIN)/ruff format --check src tests bench migrations
	$(BIN)/lint-imports

format: install  ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests bench migrations
	$(BIN)/ruff format src tests bench migrations

typecheck: install  ## mypy --strict over src/
	$(BIN)/mypy

pytest: install  ## The test suite alone
	$(BIN)/pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: install  ## Benchmarks (see bench/README.md)
	$(BIN)/python -m bench

clean:  ## Remove the environments and local data
	rm -rf .venv .tools var .pytest_cache .mypy_cache .ruff_cache
