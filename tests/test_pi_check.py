"""make pi-check's parts that run without emulation (the check itself is not in make test)."""

from __future__ import annotations

from pathlib import Path

from simulations import pi_check

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_tells_a_pi_owner_the_install_the_check_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"{pi_check.MAKE_VENV} && {pi_check.INSTALL}" in readme


def test_links_are_followed_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3.11").write_bytes(b"\x7fELF")
    (root / "usr/bin/python3").symlink_to("python3.11")  # relative
    venv = root / "home/pi/fedprune/.venv/bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to("/usr/bin/python3")  # absolute: the root's, not this machine's
    assert pi_check._resolve_in_root(root, venv / "python") == root / "usr/bin/python3.11"
