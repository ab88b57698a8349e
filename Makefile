# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck bench fault soak wheel clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/eventstore demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

fault: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m fault

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Not part of `make test`: the demo's workload under random faults for MINUTES (checks and memory report).
MINUTES ?= 30
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --minutes $(MINUTES)

# The wheel in dist/. build/ goes first: setuptools packs whatever an earlier build left in build/lib,
# so a module since renamed or removed (a top-level `migrations`, say) would ship again.
wheel: $(STAMP)
	rm -rf build
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info
