"""Certificates and keys of the local control plane (generated once per
cluster directory)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fleetkeeper.core.pki import cert_pem, make_ca, make_leaf, write_key


def write_cluster_pki(pki: Path) -> None:
    """CA, API-server serving certificate, service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "ca.crt").exists() and (pki / "sa.key").exists():
        return
    ca_key, ca_cert = make_ca("fleetkeeper-local-ca")
    write_key(pki / "ca.key", ca_key)
    (pki / "ca.crt").write_bytes(cert_pem(ca_cert))
    key, cert = make_leaf(ca_key, ca_cert, "kube-apiserver",
                          ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                           "10.96.0.1"])
    write_key(pki / "apiserver.key", key)
    (pki / "apiserver.crt").write_bytes(cert_pem(cert))
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key(pki / "sa.key", sa)
    (pki / "sa.pub").write_bytes(sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
