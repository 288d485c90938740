# One entry point per job. Each target creates .venv and installs from pyproject.toml when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make demo needs only the local pipeline (no AWS SDK, no CDK toolchain): a lighter install than make test's.
LOCAL_STAMP := $(VENV)/.installed-local

export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: install lint format test demo bench synth lock-lambdas clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(LOCAL_STAMP)

$(LOCAL_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(LOCAL_STAMP)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest -q --numprocesses=auto --dist=loadgroup

demo: $(LOCAL_STAMP)
	$(BIN)/meterlake demo

bench: install
	$(BIN)/python -m bench

synth: install
	$(BIN)/python app.py

# Re-resolve the Lambda assets' dependencies (pyproject.toml's ranges, both architectures) into
# cdk_stacks/lambda-requirements/*.txt: exact versions and wheel hashes the bundler installs. Commit the result.
lock-lambdas: install
	$(BIN)/python -m cdk_stacks.lambda_lock

clean:
	rm -rf .meterlake cdk.out .pytest_cache .mypy_cache .ruff_cache
