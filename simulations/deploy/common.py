"""Constants, the console and the error type shared by the deployment modules."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from rich.console import Console

PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent.parent
"""The Flower app (``pyproject.toml`` with ``[tool.flwr.app]``)."""
TAG_ENV: Final = "FEDPRUNE_DEPLOY_TAG"
"""Environment variable marking every process of one deployment (and its descendants)."""
DATA_DIR_ENV: Final = "FEDPRUNE_DATA_DIR"
"""Data directory of :func:`fedprune.data.load_dataset` (inherited by the ClientApp)."""
NODE_DATA_DIR_KEY: Final = "data-dir"
"""Node-config key carrying the SuperNode's data location."""
THREAD_ENVS: Final = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
DEMO_WORKDIR: Final = PROJECT_ROOT / ".flwr" / "deploy-demo"
WORKDIR_MARKER: Final = ".fedprune-deploy"
COMPLETED: Final = "finished:completed"
console = Console(stderr=True, highlight=False)


class DeploymentError(RuntimeError):
    """A deployment step failed (the message quotes the relevant log)."""
