# llamactl: `make demo` and `make test` work on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo bench gpu-check clean

install: $(STAMP)

# torch is pinned here only (pyproject says torch>=2.4): on these machines 2.13.0 resolves to the local CPU wheel,
# while a bare `torch` requirement pulls several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# The bench extra holds the references the slow tests compare with too (llama-cpp-python: llama.cpp, built from
# source by pip, several minutes once); `make test` needs none of it.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

test-all: lint $(BENCH_STAMP)
	$(PY) -m pytest -m ''

demo: $(STAMP)
	$(MAKE) -f recipes/demo.mk PY=$(abspath $(PY)) all

# Benchmarks print markdown tables and write CSV rows to bench/results/; docs/benchmarks.md keeps the figures.
# `python -P` keeps bench/ off sys.path, so a script there never shadows a module of the standard library.
bench: $(BENCH_STAMP)
	$(PY) -P bench/generate.py
	$(PY) -P bench/eval.py
	$(PY) -P bench/pretrain.py
	$(PY) -P bench/convert_memory.py
	$(PY) -P bench/tokenizer.py
	$(PY) -P bench/kernels.py
	$(PY) -P bench/sft.py --lora-rank 16
	$(PY) -P bench/dry_run.py
	$(PY) -P bench/train_rm.py
	$(PY) -P bench/rejection_sample.py
	$(MAKE) demo
	$(PY) -P bench/rlhf_cpu.py

# The GPU check: kernel tests in bf16 on CUDA, kernel benchmarks at Llama-2-7B shapes, training steps of the 1.1B
# preset, 7B-shaped decode; tables into docs/benchmarks.md (bench/gpu_check.py says what each section does). It runs
# with whatever Python holds a CUDA torch (a GPU machine's own, no .venv needed) and installs nothing but llamactl.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) -c "import llamactl.kernels" 2>/dev/null || $(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PY) -P bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info runs
