"""The ClientApp (``[tool.flwr.app.components] clientapp``), from the installed package."""

from clients.client_app import app

__all__ = ["app"]
