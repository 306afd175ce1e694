# The two commands a fresh machine needs. Each creates or updates .venv idempotently.
.PHONY: install run lint test test-all bench

install:
	bash .ci/install

run: install
	.venv/bin/python -m pipeline run --detector codetr

# Lint, format and type checks; their configuration is in pyproject.toml.
lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint
	.venv/bin/python -m pytest -q

test-all: install
	.venv/bin/python -m pytest -q -m ""

bench: install
	.venv/bin/python -m pipeline bench
