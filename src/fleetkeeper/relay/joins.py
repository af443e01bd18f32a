"""What a new node's join work is (pure: no I/O, time is an input).

:func:`decide` returns the node patch and the bootstrap pod one node still
needs; :class:`fleetkeeper.relay.pacing.JoinPacer` performs it at a paced rate.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import NodeView

if TYPE_CHECKING:  # the settings module also loads them from the cluster
    from fleetkeeper.relay.settings import PacerSettings


def done_annotation(names: Names) -> str:
    return f"{names.domain}/join-work-done"


# --- label selectors (the subset node selectors need) ---------------------------------
_REQ = re.compile(r"^\s*(!)?\s*([A-Za-z0-9./_-]+)\s*(?:(=|==|!=)\s*([A-Za-z0-9._-]*))?\s*$")


@dataclass(frozen=True)
class Selector:
    reqs: tuple[tuple[str, str, str], ...]  # (key, op, value); op in =, !=, exists, !exists

    def matches(self, labels: dict[str, str]) -> bool:
        for key, op, value in self.reqs:
            have = labels.get(key)
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
            if op == "exists" and have is None:
                return False
            if op == "!exists" and have is not None:
                return False
        return True


def parse_selector(text: str) -> Selector:
    """Parse ``k=v,k!=v,k,!k``; raises ValueError naming the bad requirement."""
    reqs = []
    for part in [p for p in text.split(",") if p.strip()]:
        m = _REQ.match(part)
        if not m:
            raise ValueError(f"cannot parse selector requirement {part.strip()!r} (supported: k=v, k!=v, k, !k)")
        neg, key, op, value = m.groups()
        if neg and op:
            raise ValueError(f"cannot parse selector requirement {part.strip()!r}")
        if op:
            reqs.append((key, "=" if op in ("=", "==") else "!=", value or ""))
        else:
            reqs.append((key, "!exists" if neg else "exists", ""))
    return Selector(tuple(reqs))


# --- decide -----------------------------------------------------------------------------
@dataclass(frozen=True)
class JoinPlan:
    node: str
    patch: dict
    pod: dict | None
    summary: str


def bootstrap_pod_name(prefix: str, node: str) -> str:
    name = f"{prefix}{node}".lower()
    if len(name) > 253:
        digest = hashlib.sha256(node.encode()).hexdigest()[:10]
        name = f"{name[:242]}-{digest}"
    return name.rstrip("-.")


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def decide(node: NodeView, cfg: PacerSettings, selector: Selector, names: Names, namespace: str,
           now: float, raw_taints: list[dict] | None = None) -> JoinPlan | None:
    """The join work ``node`` still needs, or None (done, deleting, or not selected).

    ``raw_taints`` (the node's ``spec.taints`` as the API server has them) keeps
    fields a NodeView drops, such as ``timeAdded``; the apply step passes them
    when it writes taints."""
    if node.deleting or done_annotation(names) in node.annotations or not selector.matches(node.labels):
        return None
    patch: dict = {"metadata": {"resourceVersion": node.resource_version,
                                "annotations": {done_annotation(names): _fmt(now)}}}
    if cfg.labels:
        patch["metadata"]["labels"] = dict(cfg.labels)
    have = {(t.key, t.effect) for t in node.taints}
    add = [t for t in cfg.taints if (t.key, t.effect) not in have]
    if add:
        keep = raw_taints if raw_taints is not None else [
            {"key": t.key, "value": t.value, "effect": t.effect} for t in node.taints]
        patch["spec"] = {"taints": list(keep) + [{"key": t.key, "value": t.value, "effect": t.effect} for t in add]}
    pod = None
    parts = []
    if cfg.labels:
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in sorted(cfg.labels.items())))
    if add:
        parts.append("taints " + ",".join(f"{t.key}={t.value}:{t.effect}" for t in add))
    bp = cfg.bootstrap_pod
    if bp is not None:
        ns = bp.namespace or namespace
        name = bootstrap_pod_name(bp.name_prefix, node.name)
        labels = {names.managed_by: "relay-join-pacer", **bp.labels}
        if len(node.name) <= 63:
            labels[f"{names.domain}/join-node"] = node.name
        container: dict = {"name": "bootstrap", "image": bp.image}
        if bp.command:
            container["command"] = list(bp.command)
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": dict(bp.annotations),
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node.name,
                                              "uid": node.uid}]},
            "spec": {"nodeName": node.name, "restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                     "tolerations": [{"operator": "Exists"}], "containers": [container]},
        }
        parts.append(f"bootstrap pod {ns}/{name}")
    return JoinPlan(node.name, patch, pod, "; ".join(parts) or "marked")
