# Two entry points: `make demo` (the main job on its built-in default) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: on a shared or small machine spinning threads
# fight for cores and a training step can take ten times longer.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (set PY=/path/to/python3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build that lies on this machine's disk, so that no
# dependency drags in a CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e .
	touch $@

# The browser test (tests/test_compare_browser.py) drives Debian's Chromium through its
# chromedriver (selenium's own driver download would fetch a browser from outside); installed
# where /usr/bin/chromedriver is missing, with apt-get update only if the install fails.
CHROMIUM := test -x /usr/bin/chromedriver || apt-get install -y --no-install-recommends chromium chromium-driver \
	|| { apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver; }

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	@$(CHROMIUM)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
	@$(CHROMIUM)

demo: $(VENV)/.installed
	$(BIN)/peftkit train --out runs/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

# The benchmark suite: every method beside HF PEFT and the floor (under an hour on 2 CPU cores);
# writes benchmarks/results/suite.json, benchmarks/results.png and its tables in BENCHMARKS.md.
# OpenMP's default wait policy here: timings of a busy server, not of a shared test machine.
bench: $(VENV)/.installed-test
	env -u OMP_WAIT_POLICY $(BIN)/python benchmarks/suite.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
