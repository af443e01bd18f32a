"""Certificates and keys of the local control plane (generated once per
cluster directory)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cryptography import x509

from fleetkeeper.core.pki import _sans as cert_sans
from fleetkeeper.core.pki import cert_pem, make_ca, make_leaf, write_key


def _ca(pki: Path):
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    return ca_key, ca_cert


def _sans(path: Path) -> set[str]:
    return cert_sans(x509.load_pem_x509_certificate(path.read_bytes())) if path.exists() else set()


def _write_serving(pki: Path, extra: list[str]) -> None:
    ca_key, ca_cert = _ca(pki)
    key, cert = make_leaf(ca_key, ca_cert, "kube-apiserver", API_HOSTS + extra)
    write_key(pki / "apiserver.key", key)
    (pki / "apiserver.crt").write_bytes(cert_pem(cert))


def _write_kubelet_client(pki: Path) -> None:
    """The API server's identity towards kubelets (logs, exec)."""
    ca_key, ca_cert = _ca(pki)
    key, cert = make_leaf(ca_key, ca_cert, "kube-apiserver-kubelet-client", [], client=True,
                          organization="system:masters")
    write_key(pki / "apiserver-kubelet-client.key", key)
    (pki / "apiserver-kubelet-client.crt").write_bytes(cert_pem(cert))


API_HOSTS = ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local", "10.96.0.1"]


def write_cluster_pki(pki: Path, extra_hosts: list[str] | None = None) -> None:
    """CA, API-server serving certificate (also for ``extra_hosts``: the host's address
    when a real node joins), the API server's client certificate for kubelets,
    service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    extra = list(extra_hosts or [])
    if (pki / "ca.crt").exists() and (pki / "sa.key").exists():
        if extra and not set(extra) <= _sans(pki / "apiserver.crt"):
            _write_serving(pki, extra)
        if extra and not (pki / "apiserver-kubelet-client.crt").exists():
            _write_kubelet_client(pki)
        return
    ca_key, ca_cert = make_ca("fleetkeeper-local-ca")
    write_key(pki / "ca.key", ca_key)
    (pki / "ca.crt").write_bytes(cert_pem(ca_cert))
    _write_serving(pki, extra)
    if extra:
        _write_kubelet_client(pki)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key(pki / "sa.key", sa)
    (pki / "sa.pub").write_bytes(sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
