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

# Rehearse the GPU machine's Python stack on this CPU (no GPU needed; not part of CI). The device image holds
# Python 3.12, torch 2.11 (CUDA build), Triton 3.6, transformers 5.17, Lightning 2.6.6 and no Hydra, and the GPU
# check runs there on those, nothing installed. This builds a venv of those versions (a CUDA build of torch: about
# 4 GB of downloads), runs gpu_check.py --dry-run from the checkout as the device would, then installs this package
# (editable, no dependencies) and the test-only packages and runs the whole suite. numpy is 2.3.5 here, not the
# image's 2.5.2: Triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4 on, which only the
# CPU's interpreted kernels meet (the device compiles them).
DEVICE_PY ?= python3.12
DEVICE_VENV := .venv-device
DEVICE_STACK = torch==2.11.0 triton==3.6.0 transformers==5.17.0 lightning==2.6.6 pytorch-lightning==2.6.6 \
	numpy==2.3.5 safetensors==0.8.0 torchmetrics==1.9.0 tokenizers==0.23.2 peft numba hypothesis pytest \
	pytest-xdist pytest-timeout matplotlib rich
.PHONY: device-stack
device-stack:
	$(DEVICE_PY) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install -q $(DEVICE_STACK)
	PYTHONUNBUFFERED=1 $(DEVICE_VENV)/bin/python benchmarks/gpu_check.py --dry-run --out runs/device-stack
	$(DEVICE_VENV)/bin/pip install -q hydra-core omegaconf zipnn datasets bitsandbytes 'setuptools>=77'
	$(DEVICE_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	TRITON_INTERPRET=1 $(DEVICE_VENV)/bin/pytest -q -n 2 -p no:cacheprovider
