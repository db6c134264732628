# nz_lightning developer targets. Everything runs inside .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Main job on the embedded default: train a tiny Llama on local text with NeuZip (CPU, no download).
run: $(STAMP)
	$(BIN)/python train.py +strategy=neuzip

# Codec demo: a random-init Llama-style checkpoint, compressed, inspected and restored byte-identically.
demo: $(STAMP)
	$(BIN)/nz-lightning demo --out-dir runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	TRITON_INTERPRET=1 $(BIN)/pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python benchmarks/codec.py

clean:
	rm -rf $(VENV) runs build *.egg-info

# GPU checks. They run with the .venv's python where there is one, else with the machine's own python3 (on a GPU
# machine without network: its CUDA build of torch, nothing installed); kernels/ is mapped to nz_lightning.kernels
# by benchmarks/gpu_check_env.py. Only the test files holding GPU tests are collected.
.PHONY: test-gpu gpu-check
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
GPU_TESTS = $(shell grep -rl --include='test_*.py' 'mark\.gpu' tests | sort)

# The GPU test suite, compiled Triton kernels (not interpreted).
test-gpu:
	TRITON_INTERPRET=0 $(GPU_PY) -m benchmarks.gpu_check_env pytest -q -rfEs -m gpu $(GPU_TESTS)

# Tests, codec GB/s, training memory and the Llama-3 8B step on the GPU in <= 8 minutes (benchmarks/out/gpu_check.*).
# Options through GPU_CHECK_ARGS, e.g. GPU_CHECK_ARGS='--out /tmp/out' or '--dry-run' (CPU, tiny sizes).
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
