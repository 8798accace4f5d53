# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   — the main job
#   make test   — the tests (what .ci/run calls)
#   make bench  — the speed table (BENCH_ARGS=--quick for a smoke run)
VENV ?= .venv
# malloc backed by transparent hugepages: fewer page faults on XLA's per-step temporaries
# (the tiny train step 1.16-1.49x faster; README, benchmarks); ignored where unsupported
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# the targets here run on this machine's CPU; with the tpu extra installed JAX would first try
# (and fail, with a page of warnings) to start a TPU runtime
export JAX_PLATFORMS ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: its CPU wheel is the only one we want (tests only).
	$(PY) -m pip install -q torch==2.13.0
	# the tpu extra (libtpu, ~700 MB): the tests compile for real TPU slices on this CPU
	$(PY) -m pip install -q -e ".[test,tpu]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.main --config=configs/shapes/vila.py --workdir=workdirs/shapes_vila

# Two pytest workers (pytest-xdist), one test file each at a time: most tests are compile-bound and
# XLA compiles on one thread; on 2 cores ~1.2x sooner idle, ~1.7x under load (each holds up to ~5 GB).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m ""

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
