"""What a node agent gets: small projections of Nodes, Pods and the team
ConfigMap, as plain JSON-ready dicts.

The relay keeps only these (a Pod object is several KB of JSON; an agent pod
is ~200 bytes), so one relay holds 7,500 nodes and their pods in a few
hundred MB. Labels are kept whole (agents key on team and pool labels);
annotations only under the configured prefixes (the fleetkeeper domain by
default), which drops ``kubectl.kubernetes.io/last-applied-configuration``
and other bulk. Repeated strings are interned and a node's taint and
condition lists are shared with every node that has the same ones (the docs
are read-only once made), as in :mod:`fleetkeeper.core.views`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetkeeper.core.domain import GPU_RESOURCE
from fleetkeeper.core.views import SharedValues, intern, intern_dict


@dataclass(frozen=True, slots=True)
class AgentPod:
    """One pod as its node's agent sees it."""

    node: str
    resource_version: str
    doc: dict  # {"namespace","name","uid","ip","phase","labels","annotations"}

    @property
    def key(self) -> str:
        return f"{self.doc['namespace']}/{self.doc['name']}"


@dataclass(frozen=True, slots=True)
class AgentNode:
    name: str
    resource_version: str
    doc: dict


@dataclass(frozen=True, slots=True)
class TeamConfig:
    resource_version: str
    doc: dict  # {"name","namespace","data"}


class AgentProjector:
    def __init__(self, annotation_prefixes: tuple[str, ...]):
        self.annotation_prefixes = annotation_prefixes
        self._lists = SharedValues()

    def _annotations(self, d: dict | None) -> dict[str, str]:
        if not d:
            return {}
        return intern_dict(d, self.annotation_prefixes)

    def pod(self, obj: dict) -> AgentPod:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        doc = {
            "namespace": intern(meta["namespace"]),
            "name": meta["name"],
            "uid": meta.get("uid", ""),
            "ip": status.get("podIP", "") if not spec.get("hostNetwork") else "",
            "phase": intern(status.get("phase", "Pending")),
            "labels": intern_dict(meta.get("labels") or {}),
            "annotations": self._annotations(meta.get("annotations")),
        }
        if meta.get("deletionTimestamp"):
            doc["deleting"] = True
        return AgentPod(intern(spec.get("nodeName", "")), meta.get("resourceVersion", ""), doc)

    def node(self, obj: dict) -> AgentNode:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        alloc = status.get("allocatable") or {}
        taints = tuple((t["key"], t.get("value", ""), t["effect"]) for t in spec.get("taints") or ())
        # condition heartbeats change every few seconds; only the state is kept,
        # so a heartbeat alone is not fanned out to the agent
        conds = tuple((c["type"], c.get("status", "Unknown"), c.get("reason", ""))
                      for c in status.get("conditions") or ())
        name = intern(meta["name"])
        doc = {
            "name": name,
            "uid": meta.get("uid", ""),
            "labels": intern_dict(meta.get("labels") or {}),
            "annotations": self._annotations(meta.get("annotations")),
            "taints": self._lists.get(("taints",) + taints, lambda: [
                {"key": intern(k), "value": intern(v), "effect": intern(e)} for k, v, e in taints]),
            "unschedulable": bool(spec.get("unschedulable")),
            "conditions": self._lists.get(("conditions",) + conds, lambda: [
                {"type": intern(t), "status": intern(st), "reason": intern(r)} for t, st, r in conds]),
            "gpus": intern(str(alloc.get(GPU_RESOURCE, "0"))),
        }
        return AgentNode(name, meta.get("resourceVersion", ""), doc)

    @staticmethod
    def teams(obj: dict) -> TeamConfig:
        meta = obj["metadata"]
        return TeamConfig(meta.get("resourceVersion", ""),
                          {"name": meta["name"], "namespace": meta.get("namespace", ""),
                           "data": dict(obj.get("data") or {})})
