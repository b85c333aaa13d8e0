"""Server side: Flower strategy wrappers and the fedprune ServerApp."""

import fedprune.offline  # noqa: F401  (before any flwr import)
