# sa2vp-kernels: one-command set-up, tests, demo, benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.sa2vp-installed
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)

.PHONY: install test test-cuda-asan demo demo-kernels bench gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt $(SOURCES) | $(VENV)/bin/python
	$(PIP) install -q -r requirements.txt
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory test-cuda-asan

# The CUDA kernels under the CPU emulator again, built with AddressSanitizer: any read or write outside
# a tensor's memory stops the run with a report (-s: pytest would swallow it). Needs gcc's libasan.
ASAN_LIBS = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so)
test-cuda-asan: install
	SA2VP_CUDA_EMU_ASAN=1 ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$(ASAN_LIBS)" \
	  $(PY) -m pytest -q -s tests/test_cuda_emulated.py -k "not gradcheck"

demo: install
	$(PY) -m sa2vp train

demo-kernels: install
	$(PY) -m sa2vp_kernels.demo

bench: install
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,rounds --sa2vp-save
	$(PY) bench/cpu_targets.py
	$(PY) bench/report.py $$(ls -t bench/results/cpu-2*.json | head -n 1) $$(ls -t bench/results/cpu-targets-*.json | head -n 1)

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build *.egg-info sa2vp_kernels/*.so $(VENV)
