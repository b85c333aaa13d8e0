"""Certificates and SuperNode authentication keys."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulations.deploy.common import LOOPBACK_NAMES


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`make_certificates`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format)."""

    name: str
    private: Path
    public: Path


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Return SAN entries for ``hosts`` plus the loopback names, deduplicated, in order."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*hosts, *LOOPBACK_NAMES):
        host = host.strip().strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    path.chmod(0o600)


def make_certificates(
    out_dir: str | os.PathLike[str], hosts: Sequence[str], *, days: int = 365
) -> CertPaths:
    """Create a CA and a server certificate signed by it (EC P-384, SHA-256).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (created; keys
        are written with mode 0600). Never commit these files.
    hosts : sequence of str
        Host names or IP addresses SuperNodes and ``flwr`` use to reach the SuperLink. The
        loopback names (``localhost``, ``127.0.0.1``, ``::1``) are always added: the SuperLink's
        own ``flower-superexec`` connects to it over loopback with TLS.
    days : int
        Validity of both certificates.

    Returns
    -------
    CertPaths
        The four files.
    """
    if days < 1:
        raise ValueError(f"days={days} must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprune deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    common_name = (hosts[0] if hosts else "localhost").strip("[]")
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertPaths(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    paths.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    paths.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(paths.ca_key, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    _write_private(
        paths.server_key, server_key.private_bytes(pem, pkcs8, serialization.NoEncryption())
    )
    return paths


def make_node_key(out_dir: str | os.PathLike[str], name: str) -> NodeKey:
    """Create a SuperNode key pair: ``<name>`` (private, 0600) and ``<name>.pub``.

    The format is what ``ssh-keygen -t ecdsa -b 384`` writes and what Flower loads: an OpenSSH
    EC P-384 private key for ``flower-supernode --auth-supernode-private-key`` and an OpenSSH
    public key for ``flwr supernode register``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory for the two files (created).
    name : str
        File name of the private key (a plain name).

    Returns
    -------
    NodeKey
        The key pair's paths.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / name
    public = out / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" fedprune-{name}\n".encode()
    )
    return NodeKey(name=name, private=private, public=public)
