"""The app bundle (FAB) Flower ships to every SuperNode: the entry points and the licence only.

Built with Flower's own builder (the code ``flwr build`` and ``flwr run`` call), from this
checkout's ``pyproject.toml`` (``fab-include``); the apps' code is the installed distribution.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import validate_config
from flwr.supercore.object_ref import validate

ROOT = Path(__file__).resolve().parent.parent
FAB_LIMIT = 100_000
"""Issue 15's bound on the bundle, in bytes."""


def _fab() -> tuple[bytes, dict[str, int]]:
    fab = build_fab_from_disk(ROOT)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return fab, {info.filename: info.file_size for info in archive.infolist()}


def test_pyproject_is_a_valid_flower_app_with_a_licence_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    ok, errors, warnings = validate_config(config, check_module=True, project_dir=ROOT)
    assert ok, errors
    assert not warnings, warnings
    assert config["project"]["license"] == {"file": "LICENSE"}
    text = (ROOT / "LICENSE").read_text("utf-8")
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_fab_holds_the_entry_points_and_licence_only() -> None:
    fab, files = _fab()
    entry = {f"fedprune_app/{m}.py" for m in ("__init__", "server", "client")}
    assert set(files) == {"pyproject.toml", "LICENSE", ".info/CONTENT", *entry}
    assert len(fab) < FAB_LIMIT
    # Flower stores the files uncompressed: the bundle is their bytes plus the zip's overhead.
    payload = sum(files.values())
    assert payload < len(fab) < payload + 200 * len(files) + 1024


@pytest.mark.parametrize(
    ("component", "kind", "not_imported"),
    [
        ("server", "ServerApp", "clients.client_app"),
        ("client", "ClientApp", "strategies.server_app"),
    ],
)
def test_each_app_loads_from_the_bundle_with_the_installed_code(
    tmp_path: Path, component: str, kind: str, not_imported: str
) -> None:
    """Unpack the bundle and load a component as a SuperNode / the ServerApp process does.

    Flower puts the bundle's directory first on ``sys.path`` and imports the component; every
    project module then comes from the installed packages, and a ClientApp never imports the
    server (nor the ServerApp the client).
    """
    fab, _ = _fab()
    bundle = tmp_path / "bundle"
    zipfile.ZipFile(io.BytesIO(fab)).extractall(bundle)
    assert validate(f"fedprune_app.{component}:app", check_module=True, project_dir=bundle)[0]
    code = (
        "import json, sys\n"
        "from flwr.supercore.object_ref import load_app\n"
        f"app = load_app('fedprune_app.{component}:app', RuntimeError, sys.argv[1])\n"
        "tops = ('fedprune', 'boundary', 'strategies', 'clients', 'simulations', 'fedprune_app')\n"
        "mods = {n: m.__file__ for n, m in list(sys.modules.items())\n"
        "        if n.split('.')[0] in tops and getattr(m, '__file__', None)}\n"
        "print(json.dumps({'kind': type(app).__name__, 'modules': mods}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bundle)],
        cwd=tmp_path,  # not the checkout: the bundle and the installed packages only
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["kind"] == kind
    modules = {name: Path(path) for name, path in loaded["modules"].items()}
    assert modules.pop("fedprune_app") == bundle / "fedprune_app" / "__init__.py"
    assert modules.pop(f"fedprune_app.{component}") == bundle / "fedprune_app" / f"{component}.py"
    assert modules and not any(bundle in path.parents for path in modules.values())
    assert not_imported not in modules
    assert not any(name.startswith("simulations") for name in modules)
