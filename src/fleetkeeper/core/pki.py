"""Certificates with ``cryptography``: a CA, leaf certificates, and the
self-signed serving certificate an admission webhook uses when no
cert-manager is at hand (local control plane, tests). In production, pass a
certificate and key (e.g. from cert-manager) and its CA bundle instead."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_key(path: Path, key) -> None:
    path.write_bytes(key_pem(key))
    path.chmod(0o600)


def make_ca(common_name: str, days: int = 3650):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca_key, ca_cert, common_name: str, hosts: list[str], *, days: int = 3650, client: bool = False,
              organization: str | None = None):
    """A leaf certificate for ``hosts`` (IP addresses or DNS names), signed by the CA."""
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
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH,
                                                               ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class ServingCert:
    cert: Path
    key: Path
    ca: Path

    @property
    def ca_bundle(self) -> bytes:
        return self.ca.read_bytes()


def mounted_serving_cert(directory: Path) -> ServingCert | None:
    """A serving certificate someone else made (a cert-manager or chart-made Secret
    mounted as a directory: tls.crt, tls.key and, usually, ca.crt), or None when the
    directory has no tls.crt/tls.key. Without ca.crt the certificate is its own CA."""
    cert, key, ca = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    if not (cert.exists() and key.exists()):
        return None
    return ServingCert(cert, key, ca if ca.exists() else cert)


def write_serving_cert(directory: Path, hosts: list[str], *, days: int = 365,
                       common_name: str = "fleetkeeper-webhook") -> ServingCert:
    """Create a CA and a serving certificate for ``hosts`` in ``directory``, or
    reuse the ones there while they cover every host and stay valid for a week more."""
    directory.mkdir(parents=True, exist_ok=True)
    out = ServingCert(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    if out.cert.exists() and out.key.exists() and out.ca.exists():
        cert = x509.load_pem_x509_certificate(out.cert.read_bytes())
        if set(hosts) <= _sans(cert) and \
                cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=7):
            return out
    ca_key, ca = make_ca(f"{common_name}-ca", days=days)
    key, leaf = make_leaf(ca_key, ca, common_name, hosts, days=days)
    write_key(out.key, key)
    out.cert.write_bytes(cert_pem(leaf))
    out.ca.write_bytes(cert_pem(ca))
    return out


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(ext.get_values_for_type(x509.DNSName))
