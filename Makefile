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

.PHONY: venv demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[simulation,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m simulations.compare

test: lint typecheck pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

bench: venv
	$(BIN)/python -m simulations.bench

# A real deployment on loopback: TLS SuperLink with SuperNode authentication, 2 registered
# SuperNodes, `flwr run` for 3 rounds; prints the run's results table, fails if anything did.
.PHONY: deploy-demo
deploy-demo: venv
	$(BIN)/python -m simulations.deploy demo

# A Raspberry Pi node on this machine under qemu-aarch64 (root; Debian's qemu-user-static,
# debootstrap, dataset-fashion-mnist): arm64 root in .pi/, the README's Pi install, one CNN
# round; prints install size, RSS and round time. Emulation is slow: not part of `make test`.
.PHONY: pi-check
pi-check: venv
	$(BIN)/python -m simulations.pi_check

clean:
	rm -rf $(VENV) .flwr results .pi .mypy_cache .ruff_cache .pytest_cache .hypothesis
