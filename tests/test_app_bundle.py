"""The app bundle (FAB) Flower ships to every SuperNode: the apps' code, the licence, nothing else.

Built with Flower's own builder (the code ``flwr build`` and ``flwr run`` call), from this
checkout's ``pyproject.toml`` (``fab-include``).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.config import validate_config
from flwr.common.constant import FAB_MAX_SIZE

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("fedprune", "boundary", "strategies", "clients")


def _fab() -> tuple[bytes, dict[str, int]]:
    fab = build_fab_from_disk(ROOT)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return fab, {info.filename: info.file_size for info in archive.infolist()}


def _runtime_modules() -> set[str]:
    """Project files imported by the ServerApp and the ClientApp (in a fresh interpreter)."""
    code = (
        "import json, sys, os\n"
        "import strategies.server_app, clients.client_app\n"
        f"root = {str(ROOT)!r}\n"
        "files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)]\n"
        "ours = [f for f in files if f.startswith(root) and not f.startswith(sys.prefix)]\n"
        "print(json.dumps(sorted(os.path.relpath(f, root) for f in ours)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_pyproject_is_a_valid_flower_app_with_a_licence_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    ok, errors, warnings = validate_config(config, check_module=False)
    assert ok, errors
    assert not warnings, warnings
    assert config["project"]["license"] == {"file": "LICENSE"}
    text = (ROOT / "LICENSE").read_text("utf-8")
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_fab_holds_the_apps_code_and_licence_only() -> None:
    fab, files = _fab()
    assert len(fab) < FAB_MAX_SIZE == 10 * 1024 * 1024
    tops = {name.split("/", 1)[0] for name in files}
    assert tops == {*APP_PACKAGES, "LICENSE", "pyproject.toml", ".info"}, tops
    code = {name for name in files if name.endswith(".py")}
    on_disk = {
        str(path.relative_to(ROOT))
        for package in APP_PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert code == on_disk
    assert not any("test" in Path(name).name for name in files)
    # Everything the two apps import from this project is in the bundle.
    assert _runtime_modules() <= code
    # Flower stores the files uncompressed: the bundle is their bytes plus the zip's overhead.
    payload = sum(files.values())
    assert payload < len(fab) < payload + 200 * len(files) + 1024
