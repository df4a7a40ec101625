# `make test` and `make demo` do all the set-up on a fresh machine: they create .venv when it
# is missing and install the project with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slow lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

# the fused RFA kernels, compiled once per source, torch and CPU (a second or two when built)
install: $(STAMP)
	$(PY) -m attnconv.ops.build

lint: install
	$(PY) -m ruff check .

# `make test`: every test but the cells marked slow (the full cross product of the execution-mode
# matrix, inductor compiles, end-to-end runs); `make test-slow` runs those, and CI runs both.
test: lint
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) -m attnconv.cli demo

bench: install
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
