# The two commands a fresh machine needs. Each creates or updates .venv idempotently.
.PHONY: install run test test-all bench

install:
	bash .ci/install

run: install
	.venv/bin/python -m pipeline run --detector codetr

test: install
	.venv/bin/python -m pytest -q

test-all: install
	.venv/bin/python -m pytest -q -m ""

bench: install
	.venv/bin/python -m pipeline bench
