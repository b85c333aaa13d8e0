r"""A Raspberry Pi node, checked on this machine under aarch64 emulation: ``make pi-check``.

Steps (each cached under ``.pi/``, which git ignores):

1. an arm64 Debian 12 root (Raspberry Pi OS Bookworm's base: Python 3.11), made once with
   ``debootstrap`` from Debian's packages (``.pi/root``);
2. the project's files copied to ``/home/pi/fedprune`` in it, and installed there with the
   README's Pi command (:data:`INSTALL`) — ``pip`` of the arm64 Python, from the package index;
3. on this machine, the node's data file (``python -m simulations.node_data``, Fashion-MNIST,
   partition 0 of 2) and the round-1 downlink the server's strategy builds;
4. under ``qemu-aarch64-static`` emulating a Pi 4's core (:data:`QEMU_CPU`), the client-memory
   probe (:mod:`simulations.client_memory`) of the installed package: one training round of the
   Fashion-MNIST CNN on that file through the ClientApp's ``train``, one thread, capped at
   :data:`LOCAL_STEPS` local steps (a whole epoch takes hours emulated).

It prints the install size, the imports' RSS and time, the peak RSS, the round's increase over
the imports and the round time, and exits non-zero when the peak exceeds
:data:`MAX_PEAK_MB` or the increase :data:`MAX_ROUND_MB`.

How it runs aarch64 programs without changing this machine: in a new user and mount namespace
(uids 0-65535 mapped to themselves, so ``dpkg`` may ``chown``), it mounts a private
``binfmt_misc`` (the kernel gives each user namespace its own, Linux 6.7+), registers
``qemu-aarch64-static`` for aarch64 ELF files with the ``F`` flag (the interpreter is opened
once, so it need not exist inside the root), and ``chroot``\s into the root; every process
there, ``pip``'s subprocesses included, runs emulated. Needs root, Debian's
``qemu-user-static`` and ``debootstrap``, and the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from simulations.client_memory import FASHION_MNIST_DIR

ROOT: Final = Path(__file__).resolve().parent.parent
"""The project (the files copied into the arm64 root)."""
PI_DIR: Final = ROOT / ".pi"
SUITE: Final = "bookworm"
MIRROR: Final = "http://deb.debian.org/debian"
PACKAGES: Final = ("python3", "python3-venv", "python3-pip", "ca-certificates")
QEMU: Final = Path("/usr/bin/qemu-aarch64-static")
QEMU_CPU: Final = "cortex-a72"
"""The emulated core: a Raspberry Pi 4's (ARMv8.0; a Pi 5's Cortex-A76 is a superset). qemu's
default, ``max``, has instructions no Pi has: torch 2.10's aarch64 wheel ran there and stops with
SIGILL on this core (ARMv8.1 atomics, pytorch/pytorch#176993); 2.9.1, the aarch64 pin, runs."""
LOCAL_STEPS: Final = 50
"""The round's ``local-steps`` (batches of 16): a whole epoch of partition 0 is ~2,050 steps,
at 2-4 s each under emulation here; memory is flat after the first step."""
PROJECT_IN_ROOT: Final = "/home/pi/fedprune"
DATA_IN_ROOT: Final = "/home/pi/data"
MAKE_VENV: Final = "python3 -m venv .venv"
INSTALL: Final = '.venv/bin/pip install ".[client]"'
"""The README's install command, run in the project directory on the Pi (after MAKE_VENV)."""
MAX_PEAK_MB: Final = 600.0
"""Peak RSS of the client round under emulation (emulation adds memory of its own)."""
MAX_ROUND_MB: Final = 100.0
"""The round's increase of the peak over the imports."""
_BINFMT: Final = (
    r":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    f":{QEMU}:F"
)
_CLONE_NEWUSER: Final = 0x10000000
_CLONE_NEWNS: Final = 0x00020000
_IDS: Final = 65536
_ROOT_STAMP: Final = ".fedprune-root-ok"


def _log(message: str) -> None:
    print(f"[pi-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_in_root(
    root: Path,
    command: str,
    *,
    binds: Sequence[tuple[Path, str]] = (),
    env: dict[str, str] | None = None,
) -> int:
    """Run ``command`` (``sh -c``) as root inside the arm64 ``root``, emulated; its exit code.

    Parameters
    ----------
    root : Path
        The arm64 root file system.
    command : str
        Shell command run by the root's ``/bin/sh``.
    binds : sequence of (Path, str)
        Host paths bind-mounted at paths inside the root (created if missing).
    env : dict, optional
        Extra environment (the rest is a clean ``PATH``, ``HOME=/root``, ``LANG``).
    """
    # The host's CA bundle and resolver: the package index is reached as from this machine.
    all_binds = [(Path("/etc/ssl/certs/ca-certificates.crt"), "/etc/ssl/certs/ca-certificates.crt")]
    all_binds += list(binds)
    lines = [
        "set -e",
        "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
        f"printf '%s' '{_BINFMT}' > /proc/sys/fs/binfmt_misc/register",
        *(f'mount --rbind /{sub} "$R/{sub}"' for sub in ("dev", "proc", "sys")),
        'cp /etc/resolv.conf "$R/etc/resolv.conf"',
    ]
    for host, inside in all_binds:
        kind = "-d" if host.is_dir() else "-f"
        make = f'mkdir -p "$R{inside}"' if host.is_dir() else f'touch "$R{inside}"'
        lines.append(f'[ {kind} "$R{inside}" ] || {make}')
        lines.append(f'mount --bind "{host}" "$R{inside}"')
    variables = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "QEMU_CPU": QEMU_CPU,  # read by qemu-aarch64-static, inherited by every process
    }
    variables.update(env or {})
    assignments = " ".join(f"{k}={_quote(v)}" for k, v in variables.items())
    lines.append(f'exec chroot "$R" /usr/bin/env -i {assignments} /bin/sh -c {_quote(command)}')
    script = "\n".join(lines)
    return _in_namespace(["/bin/bash", "-c", script], {"R": str(root)})


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _in_namespace(argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv`` in a new user + mount namespace with uids/gids 0-65535 mapped to themselves.

    ``unshare(1)`` maps a range only through ``newuidmap``; as root, writing the child's
    ``uid_map`` directly is allowed, so: fork, the child unshares and waits, the parent writes
    the maps, the child execs.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing but system calls until exec
        os.close(ready_r)
        os.close(go_w)
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
            os.write(2, f"unshare: {os.strerror(ctypes.get_errno())}\n".encode())
            os._exit(126)
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        os.execve(argv[0], argv, {**os.environ, **env})
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) == b"1":
            for name in ("uid_map", "gid_map"):
                Path(f"/proc/{pid}/{name}").write_text(f"0 0 {_IDS}\n")
            os.write(go_w, b"1")
    finally:
        os.close(go_w)
        os.close(ready_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"pi-check: {message}")


def build_root(root: Path) -> None:
    """Make the arm64 Debian root with ``debootstrap`` unless a finished one is there."""
    if (root / _ROOT_STAMP).is_file():
        _log(f"arm64 root: {root} (cached)")
        return
    _need(shutil.which("debootstrap") is not None, "needs debootstrap: apt-get install debootstrap")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _log(f"arm64 root: debootstrap {SUITE} into {root} (first stage: downloads)")
    include = ",".join(PACKAGES)
    subprocess.run(
        [
            *("debootstrap", "--foreign", "--arch=arm64", "--variant=minbase"),
            *(f"--include={include}", SUITE, str(root), MIRROR),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    _log("arm64 root: second stage (emulated: minutes)")
    # debootstrap tests mknod, which a user namespace may not do; "lxc" skips that test.
    code = _in_namespace(
        ["/bin/bash", "-c", _second_stage_script()], {"R": str(root), "container": "lxc"}
    )
    _need(code == 0, f"debootstrap --second-stage failed ({code}); see {root}/debootstrap")
    (root / _ROOT_STAMP).write_text(f"{SUITE} arm64 {' '.join(PACKAGES)}\n")


def _second_stage_script() -> str:
    return "\n".join(
        [
            "set -e",
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
            f"printf '%s' '{_BINFMT}' > /proc/sys/fs/binfmt_misc/register",
            *(f'mount --rbind /{sub} "$R/{sub}"' for sub in ("dev", "proc", "sys")),
            'exec chroot "$R" /debootstrap/debootstrap --second-stage',
        ]
    )


def copy_project(root: Path) -> Path:
    """Copy the project's files (git's tracked and untracked, not ignored) into the root."""
    target = root / PROJECT_IN_ROOT.lstrip("/")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    if target.exists():  # keep the virtualenv, replace the files
        for child in target.iterdir():
            if child.name != ".venv":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _resolve_in_root(root: Path, path: Path) -> Path:
    """Follow ``path``'s symbolic links as seen inside ``root`` (absolute targets in the root)."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise SystemExit(f"pi-check: too many symbolic links at {path}")


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0]) / 1024


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check (``python -m simulations.pi_check``); non-zero if it fails a target."""
    parser = argparse.ArgumentParser(prog="python -m simulations.pi_check", description=__doc__)
    parser.add_argument("--root", type=Path, default=PI_DIR / "root")
    parser.add_argument("--fresh-venv", action="store_true", help="install into a new venv")
    parser.add_argument(
        "--num-partitions", type=int, default=2, help="the node holds partition 0 of these"
    )
    parser.add_argument(
        "--local-steps",
        type=int,
        default=LOCAL_STEPS,
        help="the round's local-steps, batches of 16 (0: one whole epoch, hours emulated)",
    )
    args = parser.parse_args(argv)
    _need(os.geteuid() == 0, "must run as root (namespaces, chroot, debootstrap)")
    _need(QEMU.is_file(), f"needs {QEMU}: apt-get install qemu-user-static")
    _need(
        FASHION_MNIST_DIR.is_dir(),
        "needs the Fashion-MNIST files: apt-get install dataset-fashion-mnist",
    )
    root: Path = args.root.resolve()
    build_root(root)
    project = copy_project(root)
    if args.fresh_venv and (project / ".venv").exists():
        shutil.rmtree(project / ".venv")
    cache = PI_DIR / "pip-cache"
    cache.mkdir(parents=True, exist_ok=True)

    _log(f"install, in {PROJECT_IN_ROOT}: {MAKE_VENV} (once), then {INSTALL}")
    started = time.perf_counter()
    code = run_in_root(
        root,
        f"cd {PROJECT_IN_ROOT} && {{ [ -d .venv ] || {MAKE_VENV}; }} && {INSTALL}",
        binds=[(cache, "/root/.cache/pip")],
    )
    install_s = time.perf_counter() - started
    _need(code == 0, f"the install failed ({code})")
    install_mb = _du_mb(project / ".venv")

    data = root / DATA_IN_ROOT.lstrip("/")
    _log("node data file and round-1 downlink, written on this machine")
    subprocess.run(
        [
            *(sys.executable, "-m", "simulations.node_data", "--dataset", "fashion-mnist"),
            *("--num-partitions", str(args.num_partitions), "--partition-id", "0"),
            *("--out", str(data)),
        ],
        cwd=ROOT,
        check=True,
    )
    subprocess.run(
        [
            *(sys.executable, "-m", "simulations.client_memory", "--write-downlink"),
            *(str(data / "downlink.pb"), "--dataset", "fashion-mnist", "--model", "cnn"),
        ],
        cwd=ROOT,
        check=True,
    )
    _log(
        f"one client round under qemu-aarch64 ({QEMU_CPU}; the installed package, one thread, "
        f"local-steps {args.local_steps})"
    )
    result = data / "client-memory.txt"
    probe = (
        "cd /home/pi && OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 "
        f"{PROJECT_IN_ROOT}/.venv/bin/python -m simulations.client_memory --child "
        "--dataset fashion-mnist --model cnn --threads 1 "
        f"--local-steps {args.local_steps} --data-path {DATA_IN_ROOT}/node-0.npz "
        f"--downlink {DATA_IN_ROOT}/downlink.pb "
        f"> {DATA_IN_ROOT}/client-memory.txt"
    )
    code = run_in_root(root, probe)
    _need(code == 0, f"the client round failed ({code})")
    line = next(x for x in result.read_text().splitlines() if x.startswith("CLIENT_MEMORY "))
    measured = json.loads(line.split(" ", 1)[1])
    machine = subprocess.run(
        ["file", "-b", str(_resolve_in_root(root, project / ".venv/bin/python"))],
        capture_output=True,
        text=True,
    ).stdout.strip()
    round_mb = round(measured["peak_mb"] - measured["imports_mb"], 1)
    report = {
        "python": ",".join(machine.split(",")[:2]),
        "install_mb": round(install_mb, 1),
        "install_s": round(install_s, 1),
        **measured,
        "round_mb": round_mb,
    }
    (PI_DIR / "pi-check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"the node's python: {report['python']}")
    print(f"install size (the client's venv, aarch64): {install_mb:.0f} MB")
    print(f"imports RSS: {measured['imports_mb']:.0f} MiB ({measured['import_s']:.1f} s)")
    print(f"after loading the node's data file: {measured['data_mb']:.0f} MiB")
    print(f"peak RSS: {measured['peak_mb']:.0f} MiB (target <= {MAX_PEAK_MB:.0f})")
    print(f"round's increase over the imports: {round_mb:.0f} MiB (target <= {MAX_ROUND_MB:.0f})")
    steps = f"{args.local_steps} steps of 16" if args.local_steps else "one epoch"
    print(
        f"round time under emulation: {measured['train_s']:.1f} s "
        f"({steps} of {measured['num_examples']} examples, 1 thread, {QEMU_CPU})"
    )
    ok = measured["peak_mb"] <= MAX_PEAK_MB and round_mb <= MAX_ROUND_MB
    print("pi-check: " + ("passed" if ok else "FAILED a memory target"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
