"""Serving certificates for the webhook when no cert-manager is at hand: a
self-signed CA and a leaf for the given hosts (IPs or DNS names), written
with ``cryptography``. In production, pass --webhook-cert/--webhook-key (e.g.
from cert-manager) and the CA bundle instead."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServingCert:
    cert: Path
    key: Path
    ca: Path

    @property
    def ca_bundle(self) -> bytes:
        return self.ca.read_bytes()


def _key_bytes(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_serving_cert(directory: Path, hosts: list[str], *, days: int = 365,
                       common_name: str = "fleetkeeper-teams-webhook") -> ServingCert:
    """Create (or reuse, while valid for the same hosts) a CA and a serving certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    out = ServingCert(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    hosts_file = directory / "hosts"
    if out.cert.exists() and out.key.exists() and out.ca.exists() and hosts_file.exists() \
            and hosts_file.read_text() == ",".join(hosts):
        cert = x509.load_pem_x509_certificate(out.cert.read_bytes())
        if cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=7):
            return out
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name}-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.key.write_bytes(_key_bytes(key))
    out.key.chmod(0o600)
    out.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    hosts_file.write_text(",".join(hosts))
    return out
