# Every target creates the virtual environment on first use, so a fresh
# clone needs nothing but Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medledger demo

# Two workers, whole modules each (tests/module_scheduling.py says why).
test: $(STAMP) lint chromium
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The browser tests (portal, sign-in page) drive Debian's chromium, never a downloaded
# browser. CI runs as root: install it when it is missing; elsewhere those tests say
# why they are skipped.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y chromium || (apt-get update && apt-get install -y chromium); \
	fi

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
