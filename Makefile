# Two commands do all the set-up: `make demo` and `make test` create .venv when it is missing and
# install into it (a no-op when pyproject.toml has not changed), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the CPU wheel first, so nothing pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# animal-mnist's metadata asks for tensorflow; ldmscale reads its data files directly
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	@touch $(STAMP)

venv: $(STAMP)

# The embedded demo: a 3-size scaling study on animal-mnist, on CPU (about 15 minutes on 2 cores).
# Running it again skips finished jobs; the report lands in demo/report/.
demo: $(STAMP)
	$(VENV)/bin/ldmscale study run studies/demo.toml --out demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
