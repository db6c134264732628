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
