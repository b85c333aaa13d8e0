"""Client side: the fedprune ClientApp, its training core and a NumPyClient adapter."""
