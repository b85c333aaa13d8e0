"""Test-wide settings."""

import fedprune.offline  # noqa: F401  (before any flwr import)
