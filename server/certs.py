"""TLS certificates for a SuperLink and authentication key pairs for SuperNodes.

    python -m server.certs tls --out server/certs --host superlink.lan --host 192.168.1.10
    python -m server.certs node-key --out ~/.fedrnn/node_key

``tls`` writes a private CA (``ca.crt``/``ca.key``) and a server certificate signed by it
(``server.pem``/``server.key``), valid for every ``--host`` plus ``localhost`` and
``127.0.0.1``: the SuperLink's own ServerApp executor connects back to it locally over TLS,
so the loopback names must always be in the certificate. Devices only need ``ca.crt``
(``flower-supernode --root-certificates``); ``ca.key`` stays on the server machine.

``node-key`` writes an ECDSA P-384 key pair in OpenSSH format, exactly what
``ssh-keygen -t ecdsa -b 384 -N "" -f FILE`` makes and what Flower 1.42 reads:
``flower-supernode --auth-supernode-private-key FILE`` on the device and
``flwr supernode register FILE.pub`` on the server side. The private key never leaves the
device; only the ``.pub`` file is copied to the server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the files ``make_tls`` writes (the SuperLink's ``--ssl-*`` arguments)."""

    ca_cert: Path  # --ssl-ca-certfile on the SuperLink, --root-certificates on devices and the CLI
    ca_key: Path
    server_cert: Path  # --ssl-certfile
    server_key: Path  # --ssl-keyfile


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrnn"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600) from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(out: str | os.PathLike[str], hosts: list[str] | tuple[str, ...] = (), days: int = 365) -> TlsFiles:
    """A private CA and a server certificate for ``hosts`` (plus the loopback names)."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    names = list(dict.fromkeys([*hosts, *LOOPBACK]))
    for h in names:
        if not h or any(c.isspace() for c in h):
            raise ValueError(f"host {h!r} is not a valid DNS name or IP address")
    out = Path(out)
    now = dt.datetime.now(dt.UTC)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedrnn SuperLink CA")).issuer_name(_name("fedrnn SuperLink CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    out.mkdir(parents=True, exist_ok=True)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.ca_key, _pem_key(ca_key))
    _write_private(files.server_key, _pem_key(server_key))
    return files


def make_node_key(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: (private key file, ``.pub`` file)."""
    private = Path(path)
    if private.exists():
        # A device's identity is its key: silently replacing it would lock the device out.
        raise FileExistsError(f"{private} already exists; delete it first to make a new device identity")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public = private.with_name(private.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a private CA and a SuperLink server certificate")
    tls.add_argument("--out", required=True, help="directory for ca.crt, ca.key, server.pem, server.key")
    tls.add_argument("--host", action="append", default=[],
                     help="DNS name or IP address devices use to reach the SuperLink (repeatable)")
    tls.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    node = sub.add_parser("node-key", help="a SuperNode authentication key pair (FILE and FILE.pub)")
    node.add_argument("--out", required=True, help="private key file to create; the public key goes to FILE.pub")
    a = p.parse_args(argv)
    if a.command == "tls":
        files = make_tls(a.out, a.host, a.days)
        print(f"CA certificate (copy to every device): {files.ca_cert}\n"
              f"server certificate: {files.server_cert}\nserver key: {files.server_key}\n"
              f"CA key (keep offline, needed only to issue new certificates): {files.ca_key}")
    else:
        private, public = make_node_key(Path(a.out).expanduser())
        print(f"private key (stays on this device): {private}\npublic key (register it on the server): {public}")


if __name__ == "__main__":
    main()
