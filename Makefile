# The two commands (see README.md):  `make demo`  and  `make test`.
# Each creates its own virtual environment in .venv on first use, pinned by the lock file
# .ci/constraints-cpu.txt (every distribution, CPU build of torch); `make lock` renews it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := .ci/constraints-cpu.txt
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench browser-deps llama-server lock clean

# pip and setuptools come from the lock too, and the project is built with them
# (--no-build-isolation), so no unpinned build backend is fetched either.
$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install -q --no-build-isolation -c $(LOCK) -e '.[demo]'
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation -c $(LOCK) -e '.[demo,dev]'
	touch $@

## demo: a real kernel loads the default model and runs notebooks/01_quickstart.ipynb
demo: $(STAMP)
	$(BIN)/python -m kernel_ext.demo

## test: the whole suite, slow real-model, browser and llama.cpp-server tests included (CI runs this)
test: $(TEST_STAMP) browser-deps llama-server
	KERNEL_EXT_LLAMA_PYTHON="$$(.ci/build-llama-server.sh)" KERNEL_EXT_REQUIRE_LLAMA_SERVER=1 \
		KERNEL_EXT_REQUIRE_BLOCKDOT=1 \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-fast: everything but the tests marked slow
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## bench: the benchmarks in benchmarks/ (ratios against references measured in the same run)
bench: $(TEST_STAMP) llama-server
	KERNEL_EXT_LLAMA_PYTHON="$$(.ci/build-llama-server.sh)" $(BIN)/python -m benchmarks

## llama-server: llama.cpp's OpenAI-compatible server, built portable once per machine outside
## the repository (~10-15 min the first time; see .ci/build-llama-server.sh)
llama-server:
	@.ci/build-llama-server.sh >/dev/null

## browser-deps: Debian's Chromium for the real-browser test (Playwright drives it)
browser-deps:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install chromium; the browser test will be skipped"; \
	else echo "note: install Debian's chromium (sudo apt-get install chromium) to run the browser test"; fi

## lock: re-resolve every dependency of .[demo,dev] in a scratch venv and pin the result
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip setuptools
	.lock-venv/bin/python -m pip install -q 'torch==2.13.0'
	.lock-venv/bin/python -m pip install -q -e '.[demo,dev]'
	{ echo "# The lock: every distribution 'make' installs for .[demo,dev], exact versions."; \
	  echo "# Regenerate with 'make lock' (tests/test_install.py checks it is current)."; \
	  echo "# torch is the CPU build from this machine's disk; GPU users bring their own CUDA torch."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts

## gpu-check: on a CUDA machine, the card, the `cuda` tests and the GPU benchmark (< 10 min).
## The lock's torch==2.13.0 from PyPI is its CUDA build on Linux x86-64; nvidia-ml-py (the gpu
## extra, NVML) is not in the lock.
GPU_STAMP := $(VENV)/.installed-gpu-stamp
$(GPU_STAMP): $(TEST_STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation -c $(LOCK) -e '.[demo,dev,gpu]'
	touch $@

.PHONY: gpu-check
gpu-check: $(GPU_STAMP)
	$(BIN)/python -m benchmarks.gpu_check
