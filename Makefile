# The two commands a fresh machine needs. Each creates or updates .venv idempotently.
.PHONY: install run lint test test-all bench gpu-check

install:
	bash .ci/install

run: install
	.venv/bin/python -m pipeline run --detector codetr

# Lint, format and type checks; their configuration is in pyproject.toml.
lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# Two workers, one per core on the 2-core CI machine; each test file stays on one worker (module fixtures),
# the longest files first (tests/conftest.py, LONGEST_FIRST).
TEST_WORKERS ?= 2
test: lint
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-all: install
	.venv/bin/python -m pytest -q -m ""

bench: install
	.venv/bin/python -m pipeline bench

# The paper profile on fold 0 for gt, yolov5 and codetr on one GPU, budgets cut to fit about
# 10 minutes; prints each run's Table 2 rows and stage times. Not yet run on a GPU (none lent so far).
GPU_OUT ?= runs/gpu-check
GPU_SET = --profile paper --folds 0 --set device=cuda --set threads=0 --set unet.epochs=40 --set riad.epochs=10
gpu-check: install
	.venv/bin/python -m pipeline run --detector gt $(GPU_SET) --out $(GPU_OUT)/gt
	.venv/bin/python -m pipeline run --detector yolov5 $(GPU_SET) --set detector.options.epochs=60 --out $(GPU_OUT)/yolov5
	.venv/bin/python -m pipeline run --detector codetr $(GPU_SET) --set detector.options.train.epochs=24 --out $(GPU_OUT)/codetr
	@for d in gt yolov5 codetr; do echo "== $$d"; cat $(GPU_OUT)/$$d/table2.md; \
	  .venv/bin/python -c "import json,sys; t=json.load(open(sys.argv[1]))['timing']; print({k: round(v, 1) if isinstance(v, float) else v for k, v in t.items()})" $(GPU_OUT)/$$d/summary.json; done
