"""Test-wide settings."""

import boundary  # noqa: F401  (keeps Flower from calling out: before any flwr import)
