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
from fleetkeeper.core.plan import AddTaint, Event, NodeOp, Plan, SetAnnotation, SetLabel, node_patch
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
ACTION = "join"


@dataclass(frozen=True)
class JoinPlan:
    node: str
    ops: tuple[NodeOp, ...]
    pod: dict | None
    summary: str
    view: NodeView

    @property
    def patch(self) -> dict | None:
        """The one merge patch the applier will write (the cached resourceVersion as precondition)."""
        return node_patch(self.view, self.ops)

    def plan(self) -> Plan:
        """The node's part, for the core applier: one patch and the ``JoinWorkDone`` Event."""
        return Plan(self.node, ACTION, self.ops + (Event("JoinWorkDone", self.summary),), why=self.summary)


def bootstrap_pod_name(prefix: str, node: str) -> str:
    name = f"{prefix}{node}".lower()
    if len(name) > 253:
        digest = hashlib.sha256(node.encode()).hexdigest()[:10]
        name = f"{name[:242]}-{digest}"
    return name.rstrip("-.")


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def decide(node: NodeView, cfg: PacerSettings, selector: Selector, names: Names, namespace: str,
           now: float) -> JoinPlan | None:
    """The join work ``node`` still needs, or None (done, deleting, or not selected).

    The node's part is the configured labels, the configured taints the node
    does not have yet (added to its own, which keep their ``timeAdded``) and
    the ``join-work-done`` annotation, folded by the applier into one patch."""
    if node.deleting or done_annotation(names) in node.annotations or not selector.matches(node.labels):
        return None
    ops: list[NodeOp] = [SetLabel(k, v) for k, v in cfg.labels.items()]
    have = {(t.key, t.effect) for t in node.taints}
    add = [t for t in cfg.taints if (t.key, t.effect) not in have]
    ops += [AddTaint(t.key, t.value, t.effect) for t in add]
    ops.append(SetAnnotation(done_annotation(names), _fmt(now)))
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
    return JoinPlan(node.name, tuple(ops), pod, "; ".join(parts) or "marked", node)
