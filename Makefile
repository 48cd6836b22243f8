# Two commands: `make lab` (set up + open JupyterLab) and `make test` (set up + every test).
# Both are idempotent: the virtual environment is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PORT ?= 8888
LAB_ARGS ?=
# Tests run in JOBS processes (pytest-xdist), each test file whole in one of them (module fixtures, the browser's
# server); 2 fits a 2-core CI machine; JOBS=1 runs them serially in this process (e.g. with a debugger).
JOBS ?= 2
PYTEST_ARGS ?= $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile)
PY := $(VENV)/bin/python
# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ALLOW_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
# Two stamps: `make lab` installs what the notebooks need; `make test` adds the test tools on top.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: lab test bench setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[lab,hf,server]"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[lab,test,hf,server]"
	touch $(TEST_STAMP)

setup: $(TEST_STAMP)

lab: $(STAMP)
	cd notebooks && ../$(VENV)/bin/jupyter lab --port $(PORT) $(ALLOW_ROOT) $(LAB_ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(PY) bench/gpu_check.py
	$(PY) bench/speed.py --mode both --decode-lengths 65536 131072 262144 524288 1048576 2097152 4194304
	$(PY) bench/speed.py --mode both --coherent --lengths 131072 1048576 --decode-lengths 131072 1048576 4194304
	$(PY) bench/decode_tune.py

clean:
	rm -rf $(VENV)
