# Two commands do all set-up: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
CORES    ?= 2
PY_PATHS := src scripts tests benchmarks

.PHONY: venv demo test lint report clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

## Run the whole workflow on the bundled demo (local profile, CPU).
demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

## Run the test suite (unit, workflow and, as root with apt, a real SLURM).
test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest

## Static checks, stopping at the first problem: Python lint and format (ruff), rule format
## (snakefmt), then Snakemake's own workflow lint.
lint: $(STAMP)
	$(BIN)/ruff check $(PY_PATHS)
	$(BIN)/ruff format --check $(PY_PATHS)
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint

report: $(STAMP)
	$(BIN)/snakemake --report report.html

clean:
	rm -rf results .snakemake report.html
