"""Server side: Flower strategy wrappers and the fedprune ServerApp."""

import boundary  # noqa: F401  (keeps Flower from calling out: before any flwr import)
