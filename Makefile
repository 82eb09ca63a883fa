# Two commands matter: `make train` and `make test`. Both create .venv and install
# everything the first time (and again whenever pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export WANDB_SILENT := true

.PHONY: setup train test lint bench clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch is pinned on the same line so nothing can pull a CUDA build in behind it.
	$(BIN)/python -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[dev]"
	# DeepSpeed compiles its C++ ops on first use (30-110 s each): build them once, here.
	$(BIN)/python -m vicuna_exp.backends.build_ops
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/vicuna-exp train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The GPU check runs on the machine's own python and packages (PYTHONPATH=., no install, no .venv):
# a GPU machine may have no network for pip. bench/gpu_check.py says which wheels it needs beside it.
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
