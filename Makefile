# Entry points: `make demo` and `make test`. Both create .venv (python3.11), install the pinned
# dependencies, build the extension in place, then run. Everything else is a helper target.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
export PAGED_ATTN_BUILD_SIM ?= 1

.PHONY: demo test build deps

deps: $(VENV)/.deps-installed

$(VENV)/.deps-installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The editable install registers the package; the in-place build keeps its objects in build/,
# so ninja recompiles only what changed.
build: deps
	PAGED_ATTN_NO_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) setup.py --quiet build_ext --inplace

# The second step reruns the emulator subset marked asan_subset against an ASan+UBSan build of
# the emulator, with the sanitizer runtime preloaded into Python.
test: build
	$(PY) -m pytest tests -q -p no:cacheprovider
	env $$($(PY) csrc/sim/simt_build.py env) PAGED_ATTN_SIM_ASAN=1 \
	  $(PY) -m pytest tests/test_sim_kernels.py -m asan_subset -q -p no:cacheprovider

demo: build
	$(PY) bench/demo.py
