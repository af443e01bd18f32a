"""Certificates and keys for the local control plane (generated once per
cluster directory with ``cryptography``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(common_name: str, days: int = 3650):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_serving_cert(ca_key, ca_cert, common_name: str, hosts: list[str], days: int = 3650,
                      client: bool = False, organization: str | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH] if client else
            [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_cluster_pki(pki: Path) -> None:
    """CA, API-server serving certificate, service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "ca.crt").exists() and (pki / "sa.key").exists():
        return
    ca_key, ca_cert = make_ca("fleetkeeper-local-ca")
    _write_key(pki / "ca.key", ca_key)
    _write_cert(pki / "ca.crt", ca_cert)
    key, cert = make_serving_cert(ca_key, ca_cert, "kube-apiserver",
                                  ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                   "10.96.0.1"])
    _write_key(pki / "apiserver.key", key)
    _write_cert(pki / "apiserver.crt", cert)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki / "sa.key", sa)
    (pki / "sa.pub").write_bytes(sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))


def write_webhook_cert(directory: Path, hosts: list[str]) -> tuple[Path, Path, bytes]:
    """A self-signed CA and a serving certificate for an admission webhook.
    Returns (cert path, key path, CA bundle PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key_path, ca_path = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    if not (crt.exists() and key_path.exists() and ca_path.exists()):
        ca_key, ca_cert = make_ca("fleetkeeper-webhook-ca")
        key, cert = make_serving_cert(ca_key, ca_cert, hosts[0], hosts)
        _write_key(key_path, key)
        _write_cert(crt, cert)
        _write_cert(ca_path, ca_cert)
    return crt, key_path, ca_path.read_bytes()
