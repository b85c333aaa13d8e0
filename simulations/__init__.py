"""Run configs, the comparison harness, benchmarks and deployment scripts."""

import boundary  # noqa: F401  (keeps Flower from calling out: before any flwr import)
