# Two entry points: `make demo` and `make test`. Each creates .venv on first
# use and installs what it needs from the package registries.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install decode serve clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) experiments/demo.py

test: install
	$(PY) -m pytest tests

decode: install
	$(PY) experiments/decode.py --config=configs/decode.py --workdir=workdirs/decode

serve: install
	$(PY) experiments/serve.py --config=configs/serve.py --workdir=workdirs/serve

clean:
	rm -rf $(VENV) workdirs
