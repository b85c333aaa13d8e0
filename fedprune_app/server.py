"""The ServerApp (``[tool.flwr.app.components] serverapp``), from the installed package."""

from strategies.server_app import app

__all__ = ["app"]
