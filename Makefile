# Set-up and checks. `make demo` and `make test` bootstrap .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned for this environment (a local CPU wheel); pyproject keeps a normal range for users.
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/pip install -q --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint typecheck format bench bench-smoke bench-frameworks bench-gpu clean node_modules

$(STAMP): pyproject.toml setup.py ckpt/codecs/_planes.c $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) "$(TORCH_PIN)" 2>&1 | grep -v "is ignored" || true
	$(PIP) -e ".[dev,bench,remote]" "$(TORCH_PIN)" 2>&1 | grep -v "is ignored" || true
	for p in plugins/*/; do [ -f $$p/pyproject.toml ] && $(PIP) -e "$$p" "$(TORCH_PIN)" 2>&1 | grep -v "is ignored"; done; true
	$(BIN)/python -c "import ckpt, torch; print('ckpt', ckpt.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) node_modules
	$(BIN)/python -m pytest -q

# azurite (Azure Blob emulator) for the az store tests, into ./node_modules; without npm the
# az tests skip, saying why; a failed install makes them fail.
AZURITE ?= azurite@3.35.0
node_modules: node_modules/.bin/azurite-blob
node_modules/.bin/azurite-blob:
	@if command -v npm >/dev/null 2>&1; then \
		npm install --no-save --no-audit --no-fund --prefix . "$(AZURITE)" \
		|| echo "npm install $(AZURITE) failed: the az store tests will fail"; \
	else echo "npm not found: the az store tests will be skipped"; fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not server"

# Lint and types, configured in pyproject.toml ([tool.ruff], [tool.mypy]: core plus the plugin packages).
LINT_PATHS := ckpt tests plugins benchmarks examples

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

# Rewrites files: the formatter, then ruff's safe fixes.
format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# BENCH_ARGS: e.g. "--cold drop_caches" on an idle machine as root (default: fadvise, only the
# benchmark's own files leave the page cache), "--section core", "--mlp-layers 4" (a reduced run).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke

# Lightning's and the HF Trainer's default checkpointing vs the ckpt plugins (issue 16).
bench-frameworks: $(STAMP)
	$(BIN)/python -m benchmarks.run --section frameworks

# CUDA tests and the GPU benchmark (issue 17): D2H staging into the pinned pool, save() stall, loop
# overhead vs DCP async_save + DefaultStager; under five minutes on one GPU, figures in
# benchmarks/results/gpu.*. Without a usable CUDA device it says why and exits 0.
bench-gpu: $(STAMP)
	@if $(BIN)/python -m benchmarks.bench_gpu --probe; then \
		timeout 90 $(BIN)/python -m pytest -q -m gpu tests/snapshot/test_cuda.py && \
		timeout 200 $(BIN)/python -m benchmarks.bench_gpu --out benchmarks/results; \
	else echo "bench-gpu: nothing run (no usable CUDA device)"; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
