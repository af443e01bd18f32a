"""The join gate's admission webhook: on Node CREATE, add the preflight taint
and label in the same write, so a node that registers without them (a
kubelet missing ``--register-with-taints``) is never schedulable for an
instant. The handler is pure; the serving certificate is generated here
(self-signed) unless a cert dir (e.g. cert-manager's Secret) is given."""

from __future__ import annotations

from pathlib import Path

from fleetkeeper.core.pki import write_serving_cert
from fleetkeeper.core.webhook import Admission, AdmissionRequest, json_patch_path, registration, webhook_entry
from fleetkeeper.preflight.config import WebhookConfig
from fleetkeeper.preflight.keys import PENDING, Keys

WEBHOOK_NAME = "node-preflight-gate"
CONFIG_NAME = "fleetkeeper-preflight-gate"


def gate_node(req: AdmissionRequest, keys: Keys, exempt: dict[str, str]) -> Admission:
    """Add the preflight taint and label to a new node that lacks them."""
    if req.kind != "Node" or req.operation != "CREATE":
        return Admission(True)
    meta = req.obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if exempt and all(labels.get(k) == v for k, v in exempt.items()):
        return Admission(True)
    spec = req.obj.get("spec") or {}
    taints = spec.get("taints") or []
    ops: list[dict] = []
    has_taint = any(t.get("key") == keys.gate and t.get("effect") == "NoSchedule" for t in taints)
    value = labels.get(keys.gate) or PENDING
    if not has_taint:
        taint = {"key": keys.gate, "value": value, "effect": "NoSchedule"}
        if "spec" not in req.obj:
            ops.append({"op": "add", "path": "/spec", "value": {"taints": [taint]}})
        elif "taints" not in spec or spec.get("taints") is None:
            ops.append({"op": "add", "path": "/spec/taints", "value": [taint]})
        else:
            ops.append({"op": "add", "path": "/spec/taints/-", "value": taint})
    if keys.gate not in labels:
        if "labels" not in meta or meta.get("labels") is None:
            ops.append({"op": "add", "path": "/metadata/labels", "value": {keys.gate: value}})
        else:
            ops.append({"op": "add", "path": json_patch_path("metadata", "labels", keys.gate), "value": value})
    if not ops:
        return Admission(True)
    return Admission(True, patch=ops, warnings=[f"fleetkeeper: node gated by {keys.gate} until it passes validation"])


def self_signed(directory: Path, hosts: list[str]) -> tuple[Path, Path, bytes]:
    """Write a CA and a serving certificate for ``hosts`` (DNS names or IPs);
    returns (cert path, key path, CA PEM for the registration's caBundle)."""
    sc = write_serving_cert(directory, hosts, common_name="fleetkeeper-preflight-webhook")
    return sc.cert, sc.key, sc.ca_bundle


def gate_registration(cfg: WebhookConfig, ca_bundle: bytes, *, url: str | None = None, namespace: str = "",
                      config_name: str = CONFIG_NAME, object_selector: dict | None = None) -> dict:
    service = None if url else {"name": cfg.service_name, "namespace": namespace, "path": f"/{WEBHOOK_NAME}",
                                "port": cfg.port}
    entry = webhook_entry(
        f"{WEBHOOK_NAME}.fleetkeeper.io", url=url, service=service, ca_bundle=ca_bundle,
        rules=[{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["nodes"],
                "scope": "Cluster"}],
        failure_policy=cfg.failure_policy, timeout_seconds=5,
        object_selector=object_selector if object_selector is not None else (cfg.object_selector or None),
        reinvocation="IfNeeded")
    return registration("mutating", config_name, [entry])
