# `make demo` and `make test` create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: venv demo test lint format bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[torch,test,lint]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The venv carries libtpu (ahead-of-time compilation for TPU topologies, which works with
# JAX_PLATFORMS=cpu); on a host without TPUs its device probe only prints errors. Set
# JAX_PLATFORMS yourself to run elsewhere.
export JAX_PLATFORMS ?= cpu

demo: $(STAMP)
	$(PY) -m frameselect_jax.cli demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# ruff (.ruff.toml): the linter, and a check that the code is formatted; `make format` formats it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) demo_out
