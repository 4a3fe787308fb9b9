# llamactl: `make demo` and `make test` work on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The repository root holds `kernels/` (installed as llamactl.kernels). A Python that puts the working directory or
# a script's folder first on sys.path (`python -m ...`, `python -c`, torchrun's children) would take that folder for
# the top-level package `kernels`, which transformers imports (Hugging Face's kernels). Every process started from
# here, and each of their children, runs without that entry (Python >= 3.11: the same as `python -P`).
export PYTHONSAFEPATH := 1

.PHONY: install test test-all test-latest lint lock demo bench gpu-check clean

install: $(STAMP)

# The one torch pin (pyproject says torch>=2.4): on these machines 2.13.0 resolves to the local CPU wheel, while a
# bare `torch` requirement pulls several GB of CUDA packages. `make lock` resolves everything else around it.
TORCH := torch==2.13.0
# The locks: exact versions with hashes, made by pip-tools (pip's resolver, so it sees the local torch wheel) from
# pyproject's ranges. requirements.lock: runtime + dev (make install, make test); requirements-bench.lock: runtime +
# dev + bench (make test-all, make bench), resolved first, the other taken from it so the two agree.
LOCK := requirements.lock
BENCH_LOCK := requirements-bench.lock
PIP_TOOLS := pip-tools==7.6.2
LOCK_VENV := .venv-lock
LOCK_FLAGS := --quiet --upgrade --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
	--no-emit-index-url --no-emit-find-links

# The project itself goes in editable, without build isolation (its build backend, setuptools, is in the lock).
$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Refresh both locks to the newest versions pyproject's ranges allow (torch stays at $(TORCH)).
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q $(PIP_TOOLS); }
	echo '$(TORCH)' > $(LOCK_VENV)/torch.txt
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra dev --extra bench -c $(LOCK_VENV)/torch.txt \
		-o $(BENCH_LOCK) pyproject.toml
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra dev -c $(BENCH_LOCK) -o $(LOCK) pyproject.toml

# The suite against the newest versions pyproject's ranges allow today (torch at its pin), in a venv of its own:
# drift seen on purpose, not on a fresh machine. `make lock` then takes what passes.
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q $(TORCH)
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST_VENV)/bin/pip list --format freeze --exclude-editable
	$(LATEST_VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# The bench extra holds the references the slow tests compare with too (llama-cpp-python: llama.cpp, built from
# source by pip, several minutes once); `make test` needs none of it.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) $(BENCH_LOCK)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q --require-hashes -r $(BENCH_LOCK)
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
	$(PY) -P bench/kernel_ops.py
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
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) build *.egg-info runs
