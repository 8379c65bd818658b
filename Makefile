# The two commands of the README, on a fresh machine:  `make run`  (the main job)  and  `make test`.
# Both build a virtual environment in .venv with the CPU build of torch and fedsparse itself (compiled by
# scikit-build-core: C++ kernels, plus CUDA C++ ones where nvcc is found).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fedsparse-installed
SOURCES := $(shell find python csrc kernels -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' \)) \
           pyproject.toml CMakeLists.txt

.PHONY: run test bench install clean

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q ".[test,demo,flower]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/fedsparse run $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist
