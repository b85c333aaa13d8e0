"""The aarch64 wheels a Raspberry Pi needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from simulations.deploy.common import DeploymentError, console

AARCH64_PLATFORMS: Final = (
    "manylinux2014_aarch64",
    *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)),
)
"""pip ``--platform`` tags a 64-bit Raspberry Pi OS (glibc 2.36) accepts; pip does not expand
``manylinux_2_X`` to older tags by itself, so every level is listed."""
PI_PACKAGES: Final = ("torch", "torchvision", "opacus", "flwr")


def check_aarch64_wheels(
    packages: Sequence[str],
    *,
    dest: str | os.PathLike[str] | None = None,
    python_version: str = "3.11",
    timeout_s: float = 1800.0,
) -> dict[str, str]:
    """Download the aarch64 wheels of ``packages`` (``name==version``) with pip; report them.

    ``pip download --only-binary=:all: --no-deps`` with every manylinux tag up to glibc 2.36
    (64-bit Raspberry Pi OS Bookworm). Nothing is installed.

    Parameters
    ----------
    packages : sequence of str
        Requirements, e.g. ``["torch==2.14.1"]``.
    dest : str or os.PathLike, optional
        Where to keep the wheels (default: a temporary directory, removed).
    python_version : str
        Target Python.
    timeout_s : float
        Limit for pip.

    Returns
    -------
    dict
        Requirement -> downloaded wheel file name.

    Raises
    ------
    DeploymentError
        If pip finds no aarch64 wheel for one of them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(dest) if dest is not None else Path(tmp)
        platforms = [arg for tag in AARCH64_PLATFORMS for arg in ("--platform", tag)]
        abi = "cp" + python_version.replace(".", "")
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            *platforms,
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--abi",
            abi,
            "-d",
            str(out),
            *packages,
        ]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if result.returncode != 0:
            raise DeploymentError(f"pip download failed:\n{result.stderr[-3000:]}")
        found: dict[str, str] = {}
        for requirement in packages:
            name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]
            prefix = name.lower().replace("-", "_") + "-"
            wheels = [w.name for w in out.glob("*.whl") if w.name.lower().startswith(prefix)]
            found[requirement] = wheels[0] if wheels else "?"
            for wheel in wheels:
                _report_cuda_requirements(out / wheel)
        return found


def _report_cuda_requirements(wheel: Path) -> None:
    """Warn when a wheel's metadata pulls NVIDIA CUDA packages on Linux (any architecture)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if metadata is None:
            return
        text = archive.read(metadata).decode("utf-8", errors="replace")
    cuda = [
        line.split(":", 1)[1].split(";")[0].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
        and re.search(r"nvidia|cuda|triton", line)
        and "extra ==" not in line
    ]
    if cuda:
        console.print(
            f"[yellow]{wheel.name} requires CUDA packages on Linux: {', '.join(cuda)}; "
            "on a Raspberry Pi install the CPU build of torch first (see the README)."
        )


def installed_pins(names: Sequence[str] = PI_PACKAGES) -> list[str]:
    """Return ``name==version`` of installed distributions (the versions to look for)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in names]
