"""Client side: the fedprune ClientApp, its training core and a NumPyClient adapter."""

import boundary  # noqa: F401  (keeps Flower from calling out: before any flwr import)
