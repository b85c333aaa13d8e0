"""Client side: the fedprune ClientApp, its training core and a NumPyClient adapter."""

import fedprune.offline  # noqa: F401  (before any flwr import)
