# `make test` is the one command CI runs: it builds .venv when missing, installs the
# package with its test extra, and runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info
