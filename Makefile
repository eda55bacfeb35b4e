# make demo: create .venv, install torchkeep (torch pinned to the CPU build), run the demo.
# make test: the same set-up, then ruff, the import contracts (lint-imports) and the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench bench-load clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/torchkeep demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

test: $(STAMP) lint
	$(BIN)/python -m pytest src tests

bench: $(STAMP)
	$(BIN)/python bench/bench_save_load.py

bench-load: $(STAMP)
	$(BIN)/python bench/bench_load.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
