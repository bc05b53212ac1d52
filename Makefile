# The two Quickstart commands: `make demo` and `make test`. Each sets up .venv first (idempotent).
VENV := .venv
PYTEST := $(VENV)/bin/python -m pytest

.PHONY: setup setup-test demo test test-fast test-integration

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup
	$(VENV)/bin/maepipe demo

# Every tier: fast unit tests, multi-process DeepSpeed, real SeaweedFS / Ray / Slurm integration.
test: setup-test
	$(PYTEST) -q -ra --durations=20

test-fast: setup-test
	$(PYTEST) -q -ra -m "not integration and not dist and not slow"

test-integration: setup-test
	$(PYTEST) -q -ra -m "integration or dist or slow"
