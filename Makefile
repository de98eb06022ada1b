# The two commands of the README. Both create .venv on first use with only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/balancer.yaml

.PHONY: run test test-compiled run-compiled check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# The compiled build (setup.py): the same sources, with the request path compiled by mypyc, installed
# (not editable) in its own environment. Rebuilt when a source changes. Needs a C compiler and
# Python's headers; mypy is pinned because the generated C is mypyc's.
NATIVE   := .venv-native
NBIN     := $(NATIVE)/bin
MYPYC    := mypy==2.4.1 types-PyYAML>=6 setuptools>=77

$(NATIVE)/.installed: pyproject.toml setup.py $(wildcard balancer/*.py balancer/*/*.py balancer/static/* backends/*.py)
	test -x $(NBIN)/python || $(PYTHON) -m venv $(NATIVE)
	$(NBIN)/python -m pip install -q --upgrade pip
	$(NBIN)/python -m pip install -q $(foreach r,$(MYPYC),'$(r)')
	$(NBIN)/python -m pip install -q '.[test]'
	rm -rf build        # setuptools' build dir would carry extensions of modules no longer compiled
	BALANCER_COMPILE=1 $(NBIN)/python -m pip install -q --no-build-isolation --force-reinstall --no-deps .
	touch $@

run: $(VENV)/.installed
	exec $(BIN)/balancer run -c $(CONFIG)

check: $(VENV)/.installed
	$(BIN)/balancer check -c $(CONFIG)

# The suite runs twice: on the sources, then on the compiled build where a C compiler is found.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@if command -v cc >/dev/null && test -f "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"; \
	then $(MAKE) --no-print-directory test-compiled; \
	else echo "make test: no C compiler or no Python headers here: the compiled pass is skipped"; fi

# PYTHONSAFEPATH: no `python -m balancer` may pick up the sources from its working directory.
test-compiled: $(NATIVE)/.installed
	PYTHONSAFEPATH=1 BALANCER_EXPECT_COMPILED=1 $(NBIN)/pytest -p no:python_path -p no:cacheprovider $(PYTEST_ARGS)

run-compiled: $(NATIVE)/.installed
	exec $(NBIN)/balancer run -c $(CONFIG)

bench: $(VENV)/.installed
	bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(NATIVE) .pytest_cache build *.egg-info
