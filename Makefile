# Two commands do all the set-up: `make demo` and `make test` create .venv when it is missing and
# install into it (a no-op when pyproject.toml has not changed), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-seeds demo-full backbones isoflop test bench venv clean

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

# a study's training jobs run side by side, a process per core with a thread each (a 2-core CPU trains 1.6-1.9x the
# images a second that way, bench/side_by_side.py: small models leave a core idle between operations); STUDY_JOBS=1: one at a time
STUDY_JOBS ?= $(shell nproc 2>/dev/null || echo 1)

# The embedded demo: a 3-size scaling study on animal-mnist, on CPU (19-26 minutes on 2 cores), ending with
# the paper's claims checked and the planner's answers. Running it again skips finished jobs; the report lands
# in demo/report/.
demo: $(STAMP)
	$(VENV)/bin/ldmscale study run studies/demo.toml --out demo --jobs $(STUDY_JOBS)

# The demo with training seeds 1 and 2 beside the demo's seed 0 (the demo's jobs are reused), so that every verdict's
# error holds training noise, with a negative control: docs/demo.md
demo-seeds: $(STAMP)
	$(VENV)/bin/ldmscale study run studies/demo-seeds.toml --out demo --jobs $(STUDY_JOBS)

# The demo plus super-resolution and consistency distillation of two sizes (claims 2, 5 and 6), in the same
# folder: the demo's finished jobs are reused.
demo-full: $(STAMP)
	$(VENV)/bin/ldmscale study run studies/downstream.toml --out demo --jobs $(STUDY_JOBS)

# UNets against DiTs at three training budgets (IsoFLOP) on the demo's data: docs/backbones.md
backbones: $(STAMP)
	$(VENV)/bin/ldmscale study run studies/backbones.toml --out backbones --jobs $(STUDY_JOBS)

# one pytest-xdist worker per core (TEST_WORKERS=1 for a serial run); multi-process tests share one worker
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
# The compute-optimal size on this machine: seven UNet widths at four annealed training budgets, the largest one
# predicted and then measured (docs/isoflop.md)
isoflop: $(STAMP)
	$(VENV)/bin/ldmscale study run studies/isoflop.toml --out isoflop --jobs $(STUDY_JOBS)

test: $(STAMP)
	$(PY) -m ruff check ldmscale tests bench   # the rules and why: [tool.ruff] in pyproject.toml
	$(PY) -m ruff format --check ldmscale tests bench
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
