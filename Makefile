# `make demo` shows the toy world (committed teacher, evaluated at 50 and 2 steps) in minutes;
# `make test` is the one command CI runs. Both build .venv when missing and install the package
# with its test extra first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m qwen_jax.toy.demo --out runs/demo

# Two workers, each taking whole files (module fixtures are built once): the suite is mostly
# single-threaded XLA compiles, so this roughly halves its time on two cores.
test: install
	$(PY) -m pytest tests -n 2 --dist loadfile

bench: install
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info
