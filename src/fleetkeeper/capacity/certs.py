"""The gang webhook's serving certificate: a private CA and a serving
certificate, generated once into a directory (or supplied by cert-manager on
a real cluster: pass --webhook-cert/--webhook-key/--webhook-ca)."""

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
class WebhookCert:
    cert: Path
    key: Path
    ca_bundle: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ensure_webhook_cert(directory: Path, hosts: list[str], days: int = 365) -> WebhookCert:
    """Reuse the certificate in ``directory`` if it covers ``hosts`` and is valid
    for another day; otherwise write a new CA and serving certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_p, key_p, ca_p = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    if cert_p.exists() and key_p.exists() and ca_p.exists():
        cert = x509.load_pem_x509_certificate(cert_p.read_bytes())
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | \
                   {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            have = set()
        fresh = cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
        if fresh and set(hosts) <= have:
            return WebhookCert(cert_p, key_p, ca_p.read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fleetkeeper-capacity-webhook-ca"))
          .issuer_name(_name("fleetkeeper-capacity-webhook-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    key_p.chmod(0o600)
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_p.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return WebhookCert(cert_p, key_p, ca_p.read_bytes())
