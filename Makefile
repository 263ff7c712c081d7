PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-fast demo bench lint clean

install: $(STAMP)

# The CPU torch wheel is installed first and pinned, so that nothing below pulls a
# multi-GB CUDA build. GPU users: install your own torch into .venv before `make install`.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	# deepspeed's setup.py imports torch: build it against the torch already installed.
	$(BIN)/pip install -q --no-build-isolation -e ".[deepspeed,tensorboard,dev,bench]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -x tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	bash scripts/demo.sh

bench: install
	$(BIN)/python benchmarks/bench_sft.py

lint: install
	$(BIN)/ruff check rlhf_cli tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
