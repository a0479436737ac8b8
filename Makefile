# The two set-up commands of the README: `make demo` and `make test`.
.PHONY: venv demo test services bench bench-peers lint

venv:
	@bash scripts/bootstrap.sh

demo: venv
	.venv/bin/d2v demo speech

services:
	@bash scripts/install-test-services.sh

# Two workers, each running whole test files (module fixtures are built once): most tests wait on
# subprocesses and servers, so two cores do the suite in about two thirds of the serial time.
PYTEST_WORKERS ?= 2

test: venv services
	.venv/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

bench: venv
	.venv/bin/python benchmarks/run_all.py

bench-peers: services
	@bash scripts/bootstrap-peers.sh
	.venv-peers/bin/python benchmarks/bench_loader_peers.py

lint: venv
	@.venv/bin/python -m ruff --version >/dev/null 2>&1 || .venv/bin/pip install -q ruff
	.venv/bin/python -m ruff check .
