"""Run configs, the comparison harness, benchmarks and deployment scripts."""

import fedprune.offline  # noqa: F401  (before any flwr import)
