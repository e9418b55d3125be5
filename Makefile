# Every target creates the virtual environment on first use, so a fresh
# clone needs nothing but Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medledger demo

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Every registered benchmark (private, records, consortium, hybrid, …): JSON in
# bench/results/, the generated summary in docs/benchmarks.md, plots in docs/.
bench: $(STAMP)
	$(BIN)/medledger bench all --results-dir bench/results

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
