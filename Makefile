# The two set-up commands: `make run` (the main job on defaults) and `make test` (the test suite).
# Each bootstraps .venv with the CPU build of torch 2.13.0 and the package.
PY := .venv/bin/python
STAMP := .venv/.moekit-installed

.PHONY: run test lint format bench venv

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	.venv/bin/moekit train

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py
