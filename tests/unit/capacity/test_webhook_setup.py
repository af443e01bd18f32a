"""The webhook's registration and certificate."""

from __future__ import annotations

import ssl

from cryptography import x509

from fleetkeeper.core.pki import write_serving_cert as ensure_webhook_cert
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import webhook_registration
from fleetkeeper.core.domain import Names


def test_registration_is_scoped_to_gang_pods_and_fails_closed():
    reg = webhook_registration(CapacityConfig(), Names("example.com"), "cfg", None, b"CA", service_namespace="fk")
    assert reg["kind"] == "MutatingWebhookConfiguration" and reg["metadata"]["name"] == "cfg"
    wh = reg["webhooks"][0]
    assert wh["failurePolicy"] == "Fail" and wh["sideEffects"] == "None"
    assert wh["objectSelector"] == {"matchExpressions": [{"key": "example.com/gang", "operator": "Exists"}]}
    assert wh["rules"][0]["operations"] == ["CREATE"] and wh["rules"][0]["resources"] == ["pods"]
    assert wh["clientConfig"]["service"] == {"name": "fleetkeeper-capacity-webhook", "namespace": "fk",
                                             "path": "/capacity-gang", "port": 9445}


def test_registration_by_url_with_namespace_selector():
    sel = {"matchLabels": {"kubernetes.io/metadata.name": "t"}}
    reg = webhook_registration(CapacityConfig(), Names(), "cfg", "https://127.0.0.1:1/capacity-gang", b"CA", sel)
    wh = reg["webhooks"][0]
    assert wh["clientConfig"]["url"].startswith("https://127.0.0.1") and wh["namespaceSelector"] == sel


def test_cert_is_reused_and_renewed_for_new_hosts(tmp_path):
    a = ensure_webhook_cert(tmp_path, ["127.0.0.1", "svc.ns.svc"]).ca_bundle
    b = ensure_webhook_cert(tmp_path, ["127.0.0.1"]).ca_bundle
    assert a == b  # same hosts covered: reused
    c = ensure_webhook_cert(tmp_path, ["127.0.0.1", "other.ns.svc"])
    assert c.ca_bundle != a
    cert = x509.load_pem_x509_certificate(c.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "other.ns.svc" in sans.get_values_for_type(x509.DNSName)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(c.cert), str(c.key))  # a usable key pair
    assert (c.key.stat().st_mode & 0o777) == 0o600


def test_with_gangs_off_a_gang_member_is_admitted_unchanged_with_a_warning():
    """The chart's registration (failurePolicy Fail) stays when gangs are turned off in the ConfigMap: the
    webhook then admits gang members unchanged instead of leaving them to be refused."""
    from fleetkeeper.capacity.controller import gangs_off
    from fleetkeeper.capacity.gangs import mutate_pod
    from fleetkeeper.core.admission import AdmissionRequest

    names = Names("example.com")
    pod = {"metadata": {"name": "p", "labels": {"example.com/gang": "train"}}, "spec": {"containers": []}}
    req = AdmissionRequest("u", "Pod", "CREATE", "ns", "p", "alice", (), pod, None, False, "")
    off = gangs_off(req, names)
    assert off.allowed and not off.patch and "gangs.enabled: false" in off.warnings[0]
    assert mutate_pod(req, CapacityConfig(), names).patch  # on: the same pod is made a gang member
    plain = AdmissionRequest("u", "Pod", "CREATE", "ns", "p", "alice", (), {"metadata": {"name": "p"}}, None,
                             False, "")
    assert gangs_off(plain, names).warnings == []
