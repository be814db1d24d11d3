# dsrna: every target that runs code first creates the virtual environment .venv when it is missing
# (or when the pinned requirements or the build inputs changed), so `make search` and `make test`
# work on a fresh clone with only Python 3.11+, pip and a C++ compiler.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The quick-start search: DSRNA-Jacobian on the shipped MNIST subset with a tiny super-network, a few
# minutes on 2 CPU cores.
SEARCH_ARGS ?= --dataset mnist-mini --robustness jacobian --epochs 2 --max-steps-per-epoch 30 --batch-size 32 --layers 3 --init-channels 4 --out runs/quickstart
# The CPU smoke run of the benchmark harness; on a GPU use `make bench BENCH_ARGS=` for the full set.
BENCH_ARGS ?= --quick
GPU_OUT ?= gpu_results

BUILD_INPUTS := requirements.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: search test bench gpu-check clean distclean

# A file target: the environment is built once, and again only when its inputs change.
# Order matters: torch and the build tools first, then the package and its extension dsrna._C built
# against that torch (--no-build-isolation: no second torch in a throwaway build environment).
$(VENV)/.installed: $(BUILD_INPUTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	# The attack extra (C&W, AutoAttack), so its tests run: torchattacks without its requests~=2.25 pin,
	# which it never imports.
	$(BIN)/python -m pip install --no-deps torchattacks==3.5.1
	$(BIN)/python -m pip install --no-build-isolation -e .
	touch $@

search: $(VENV)/.installed
	$(BIN)/dsrna search $(SEARCH_ARGS)

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(BIN)/pytest -q -n 2 --dist loadfile --durations=15

bench: $(VENV)/.installed
	$(BIN)/dsrna bench $(BENCH_ARGS)

# On the GPU machine (torch preinstalled, no network): builds the extension there, runs the GPU
# tests and the benchmark, and writes everything into $(GPU_OUT). It does not use .venv.
gpu-check:
	OUT=$(GPU_OUT) bash benchmarks/gpu_check.sh

# Build outputs and caches; the virtual environment and the runs/ folder stay.
clean:
	rm -rf build dist *.egg-info .pytest_cache
	find dsrna kernels -name '*.so' -delete
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
