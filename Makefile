# fedcare: two commands from a fresh machine with Python 3.11+ and pip.
#   make demo   set up .venv, then simulate 4 private hospitals on the embedded data
#   make test   set up .venv, then run the whole test suite
#   make gpu-check  the device paths on this machine's GPU (CPU parts only without CUDA)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install demo test gpu-check flwr-run clean bench bench-quick wheelhouse

install: $(STAMP)

# torch first, pinned: an open requirement would pull a multi-GB CUDA build on CPU machines
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/fedcare simulate

test: install
	$(BIN)/python -m pytest -q

# one line per device check, then "N passed, N failed"; under 5 min on one GPU (docs/benchmarks.md)
gpu-check: install
	$(BIN)/python -m simulations.gpu_check

# the same defaults through Flower's own runner (local simulation, project-local Flower home)
flwr-run: install
	mkdir -p .flwr && test -f .flwr/config.toml || cp simulations/flwr_config.toml .flwr/config.toml
	FLWR_HOME=$(CURDIR)/.flwr PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/flwr run . --stream

# the benchmark (docs/benchmarks.md): results.json, results.md and plots in runs/bench-<time>/
# bench: every section, ~2.5 h on 2 CPU cores; bench-quick: ~12 min
# e.g. make bench BENCH_ARGS="--device cuda --out runs/bench-gpu"
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m simulations.bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m simulations.bench --quick $(BENCH_ARGS)

# every wheel fedcare needs but torch, for a machine with no network that has Python and
# its own torch 2.11-2.13 (a hospital's GPU server); copy this folder and wheelhouse/ there:
#   make wheelhouse WHEEL_PYTHON=3.12      (that machine's Python; Linux x86_64 by default)
#   pip install --no-index --find-links wheelhouse -c wheelhouse/constraints.txt -e .
WHEEL_PYTHON ?= 3.11
# pip takes a wheel only for a tag named here: a glibc-2.28 machine also runs older manylinux tags
WHEEL_PLATFORMS ?= $(foreach v,2_28 2_27 2_24 2_17 2_12 2_5,manylinux_$(v)_x86_64) manylinux2014_x86_64
wheelhouse:
	mkdir -p wheelhouse
	grep -v '^torch==' constraints.txt > wheelhouse/constraints.txt
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
	  --implementation cp --python-version $(WHEEL_PYTHON) $(addprefix --platform ,$(WHEEL_PLATFORMS)) \
	  -d wheelhouse -r wheelhouse/constraints.txt 'setuptools>=69'

clean:
	rm -rf $(VENV) .flwr runs
