# sa2vp-kernels: one-command set-up, tests, demo, benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.sa2vp-installed
# pytest-xdist workers for `make test`'s tests/ (0: one process; the script tests and the sanitizer
# runs gained nothing from two workers on two cores)
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)

.PHONY: install test test-cuda-sanitizers test-asan test-tsan demo demo-kernels bench gpu-check gpu-tune clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt $(SOURCES) | $(VENV)/bin/python
	$(PIP) install -q -r requirements.txt
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(XDIST) tests
	$(PY) -m pytest -q -p no:cacheprovider bench/test_scripts.py
	$(MAKE) --no-print-directory test-cuda-sanitizers

# The CUDA kernels under the CPU emulator again, built with AddressSanitizer (any access outside a
# tensor's memory stops the run) and with ThreadSanitizer (threads of a block that touch the same memory,
# one writing, with no barrier between). The two runs go side by side, one OpenMP thread each (libgomp is
# not instrumented; the emulated threads of a block are threads of their own either way), each one's
# output printed when it ends. -s: pytest would swallow the reports. Needs gcc's libasan and libtsan.
SAN_LIB = $(shell gcc -print-file-name=lib$(1).so) $(shell gcc -print-file-name=libstdc++.so)
test-cuda-sanitizers: install
	$(MAKE) --no-print-directory -j2 --output-sync=target test-asan test-tsan

test-asan: install
	SA2VP_CUDA_EMU_SANITIZER=address ASAN_OPTIONS=detect_leaks=0 OMP_NUM_THREADS=1 LD_PRELOAD="$(call SAN_LIB,asan)" \
	  $(PY) -m pytest -q -s -p no:cacheprovider tests/test_cuda_emulated.py -k "not gradcheck"

test-tsan: install
	SA2VP_CUDA_EMU_SANITIZER=thread TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0" OMP_NUM_THREADS=1 LD_PRELOAD="$(call SAN_LIB,tsan)" \
	  $(PY) -m pytest -q -s -p no:cacheprovider tests/test_cuda_emulated.py -k "not gradcheck and not selftest_race"

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

gpu-tune:
	bash bench/gpu_tune.sh

clean:
	rm -rf build *.egg-info sa2vp_kernels/*.so $(VENV)
