# Two entry points: `make demo` and `make test`. Each creates .venv on first
# use and installs what it needs from the package registries.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install decode serve notebooks clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The paging CLI; e.g. make demo DEMO_ARGS="--slots_per_layer=2,3,4,4 --policy=lfu"
DEMO_ARGS ?= --experts=paged --slots_per_layer=4 --policy=lru

demo: install
	$(PY) experiments/demo.py $(DEMO_ARGS)

test: install
	$(PY) -m pytest tests

decode: install
	$(PY) experiments/decode.py --config=configs/decode.py --workdir=workdirs/decode

serve: install
	$(PY) experiments/serve.py --config=configs/serve.py --workdir=workdirs/serve

# Executes every notebook at CI size, as the test suite does.
notebooks: install
	$(PY) -m pytest tests/notebooks_test.py -n 0

clean:
	rm -rf $(VENV) workdirs
