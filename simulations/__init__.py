"""Run configs, the comparison harness, benchmarks and deployment scripts."""
