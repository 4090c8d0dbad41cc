"""TLS material for a Flower deployment: a private CA and a SuperLink certificate it signs.

`fedseg flower certs -o DIR --host coordinator.example.org` writes

    ca.pem        the CA certificate: every site gets a copy (`flower join --root-certificates`)
    ca.key        the CA's private key: stays with the coordinator's operator (signs new certificates)
    server.pem    the SuperLink's certificate, valid for the given host names and IP addresses
    server.key    the SuperLink's private key (`flower serve --ssl-keyfile`)

Keys are ECDSA P-256 (what gRPC and every current TLS stack accept, small and fast). Private
keys are written with mode 0600. Nothing existing is overwritten: the CA is the root of the
federation's trust, and replacing it by accident would lock every site out.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg.atomic import atomic_path
from fedseg.errors import InputError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
# A federation runs for weeks to months; two years leaves room without being forever.
DEFAULT_DAYS = 730


@dataclass
class CertificateFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: list[str]


def _subject_names(hosts: Sequence[str]):
    names = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise InputError("--host must not be empty")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically; the temporary file is created 0600, so a private key is never readable by others."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, mode)


def make_certificates(out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = DEFAULT_DAYS) -> CertificateFiles:
    """Write a CA and a SuperLink certificate for `hosts` (DNS names or IP addresses) into `out_dir`."""
    out_dir = Path(out_dir)
    hosts = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    if days < 1:
        raise InputError(f"--days must be at least 1, not {days}")
    files = CertificateFiles(out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY, hosts)
    existing = [p for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key) if p.exists()]
    if existing:
        raise InputError("already exists; certificates are never overwritten (choose another folder)", existing[0])
    subject_names = _subject_names(hosts)

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)   # 5 min: clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseg federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(subject_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def private_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    out_dir.mkdir(parents=True, exist_ok=True)
    _write(files.ca_key, private_pem(ca_key), 0o600)
    _write(files.server_key, private_pem(server_key), 0o600)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files
