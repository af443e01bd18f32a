"""Test-pod manifests (pure). One pod per node and attempt, pinned to the node by
node affinity (the scheduler still places it, so resources and preemption
apply), holding all the node's GPUs, running ``fleetkeeper validate`` under a
ServiceAccount with no permissions and no API token."""

from __future__ import annotations

import hashlib

from fleetkeeper.core.domain import GPU_RESOURCE, HOSTNAME_LABEL
from fleetkeeper.core.views import NodeView
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.keys import GATE, NOT_READY_TAINT, PERIODIC, SIM_DELAY, SIM_MESSAGE, SIM_RESULT, Keys

HMAC_KEY_FIELD = "hmac-key"
TERMINATION_LOG = "/dev/termination-log"


def pod_name(kind: str, node: str, cycle: str, attempt: int) -> str:
    h = hashlib.sha256(f"{node}/{cycle}".encode()).hexdigest()[:8]
    return f"pf-{kind}-{node[:200]}-{h}-{attempt}"[:253].rstrip("-.")


def test_pod(node: NodeView, kind: str, name: str, nonce: str, profile: str, cfg: PreflightConfig, keys: Keys,
             namespace: str, *, sim: tuple[bool, str] | None = None, sim_delay_ms: int = 0) -> dict:
    labels = {keys.pod_kind: kind, keys.pod_node: node.name[:63], keys.component: "preflight"}
    annotations = {keys.nonce: nonce, keys.profile: profile, keys.pod_node: node.name}
    if sim is not None:
        annotations[SIM_RESULT] = "succeed" if sim[0] else "fail"
        annotations[SIM_MESSAGE] = sim[1]
        if sim_delay_ms:
            annotations[SIM_DELAY] = f"{sim_delay_ms}ms"
    resources: dict = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
    if node.gpus:
        resources["requests"][GPU_RESOURCE] = str(node.gpus)
        resources["limits"][GPU_RESOURCE] = str(node.gpus)
    tolerations = [{"key": keys.names.team, "operator": "Exists"}]
    if kind == GATE:
        tolerations.append({"key": keys.gate, "operator": "Exists", "effect": "NoSchedule"})
        if cfg.gate.start_when_ready:  # runs while kube-controller-manager lifts the not-ready taint
            tolerations.append({"key": NOT_READY_TAINT, "operator": "Exists", "effect": "NoSchedule"})
    env = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PREFLIGHT_NONCE", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{keys.nonce}']"}}},
        {"name": "PREFLIGHT_KEY", "valueFrom": {"secretKeyRef": {"name": cfg.key_secret, "key": HMAC_KEY_FIELD}}},
    ]
    spec: dict = {
        "restartPolicy": "Never",
        "serviceAccountName": cfg.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 5,
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node.name]}]}]}}},
        "tolerations": tolerations,
        "containers": [{
            "name": "validate", "image": cfg.image,
            "command": ["fleetkeeper", "preflight", "validate", "--json", "--profile", profile,
                        "--termination-log", TERMINATION_LOG],
            "env": env, "resources": resources,
            "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "File",
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False},
        }],
    }
    if kind == PERIODIC:
        spec["priorityClassName"] = cfg.periodic.priority_class
    else:
        spec["nodeSelector"] = {HOSTNAME_LABEL: node.labels.get(HOSTNAME_LABEL, node.name)} \
            if HOSTNAME_LABEL in node.labels else {}
        if not spec["nodeSelector"]:
            del spec["nodeSelector"]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}] if node.uid else []},
        "spec": spec,
    }


def priority_class(cfg: PreflightConfig, keys: Keys) -> dict:
    return {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": cfg.periodic.priority_class, "labels": {keys.component: "preflight"}},
            "value": cfg.periodic.priority, "preemptionPolicy": "Never", "globalDefault": False,
            "description": "fleetkeeper periodic GPU validation: below all real work, which preempts it"}
