# One entry point per job. Each bootstraps .venv when it is missing (idempotent: a stamp
# file is refreshed only when pyproject.toml changes), then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Flower: keep its state inside the project and never let `flwr run` install dependencies
# into a fresh environment per run (it would ignore our pins and take minutes).
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
# No calls out: Flower's telemetry and update check are on by default.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test lint typecheck pytest bench clean test-py313

# The last step writes the same Flower variables into the venv (a .pth file that sets each one
# unless it is already set), so a plain `flwr run .` has them too: see simulations/local_superlink.py.
$(STAMP): pyproject.toml simulations/local_superlink.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[simulation,mlflow,dev]"
	$(BIN)/python -m simulations.local_superlink install
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m simulations.compare

test: lint typecheck pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

bench: venv
	$(BIN)/python -m simulations.bench

# The Python 3.13 leg: its own .venv313 (same install), then the suite without the slow
# end-to-end runs plus one real Ray simulation. PYTHON313 defaults to pyenv's 3.13.
PYTHON313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
VENV313 := .venv313
$(VENV313)/.installed-stamp: pyproject.toml simulations/local_superlink.py
	test -x $(VENV313)/bin/python || $(PYTHON313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install --quiet --upgrade pip
	$(VENV313)/bin/python -m pip install --quiet -e ".[simulation,mlflow,dev]"
	$(VENV313)/bin/python -m simulations.local_superlink install
	touch $@

test-py313: $(VENV313)/.installed-stamp
	$(VENV313)/bin/python --version
	$(VENV313)/bin/pytest -q -m "not slow" -p no:cacheprovider
	$(VENV313)/bin/pytest -q -p no:cacheprovider tests/test_sampling.py

# A real deployment on loopback: TLS SuperLink with SuperNode authentication, 2 registered
# SuperNodes, `flwr run` for 3 rounds; prints the run's results table, fails if anything did.
.PHONY: deploy-demo
deploy-demo: venv
	$(BIN)/python -m simulations.deploy demo

# The socket of a real deployment (TLS + SuperNode auth on loopback, each SuperNode through a
# byte-counting relay): FedAvg float32, int8-topk0.05-delta and tern-topk0.05 on Fashion-MNIST,
# 5 rounds each, plus a 60 s idle window. Minutes of CPU, so not part of `make bench`; its keys
# (socket_ratio_steady, socket_overhead_per_node_round_bytes, fab_bytes, ...) are merged into
# results/bench/bench.json and the table is written to docs/results/wire.md.
.PHONY: wire-bench
wire-bench: venv
	$(BIN)/python -m simulations.bench_wire

# A Raspberry Pi node on this machine under qemu-aarch64 (root; Debian's qemu-user-static,
# debootstrap, dataset-fashion-mnist): arm64 root in .pi/, the README's Pi install, one CNN
# round; prints install size, RSS and round time. Emulation is slow: not part of `make test`.
.PHONY: pi-check
pi-check: venv
	$(BIN)/python -m simulations.pi_check

clean:
	rm -rf $(VENV) $(VENV313) .flwr results .pi .mypy_cache .ruff_cache .pytest_cache .hypothesis
