PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
EXTRAS := deepspeed,tensorboard,dev,bench,qlora
# The versions the test suite last passed with (pip constraints; torch is pinned above instead,
# so GPU users keep their own CUDA build). `make upgrade` refreshes it.
LOCK := constraints.txt

.PHONY: install upgrade test test-slow test-all demo bench bench-dpo bench-ppo lint clean

install: $(STAMP)

# The CPU torch wheel is installed first and pinned, so that nothing below pulls a
# multi-GB CUDA build. GPU users: install your own torch into .venv before `make install`.
$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade -c $(LOCK) pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	# deepspeed's setup.py imports torch: build it against the torch already installed.
	$(BIN)/pip install -q --no-build-isolation -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Take the newest releases pyproject.toml's ranges allow (torch stays as installed), write
# them to constraints.txt, and run the tests: commit constraints.txt only if they pass.
upgrade: install
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q --upgrade --upgrade-strategy eager --no-build-isolation \
		-c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	$(BIN)/pip freeze --all --exclude-editable | grep -v -e '^torch==' -e '^#' > $(LOCK)
	touch $(STAMP)
	$(MAKE) test

# The default suite: unit, equivalence and end-to-end tests on the tiny model (~10 min on 2
# cores). The slow ones (multi-process, per-arrangement PPO learning, 1M-row memory, kill
# tests) run in CI after it: `make test-slow`, or everything with `make test-all`.
test: install
	$(BIN)/python -m pytest -q -x -m "not slow" tests

test-slow: install
	$(BIN)/python -m pytest -q -x -m slow tests

test-all: install
	$(BIN)/python -m pytest -q -x tests

demo: install
	bash scripts/demo.sh

# bench: SFT against trl (~2 min idle); bench-dpo: DPO against trl; bench-ppo: the four PPO
# arrangements. Add e.g. BENCH_ARGS="--repeats 3 --json-out out.json".
bench: install
	$(BIN)/python benchmarks/bench_sft.py $(BENCH_ARGS)

bench-dpo: install
	$(BIN)/python benchmarks/bench_dpo.py $(BENCH_ARGS)

bench-ppo: install
	$(BIN)/python benchmarks/bench_ppo.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check rlhf_cli tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
