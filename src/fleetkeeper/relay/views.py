"""What a node agent gets: small projections of Nodes, Pods and the team
ConfigMap, as plain JSON-ready dicts.

The relay keeps only these (a Pod object is several KB of JSON; an agent pod
is ~200 bytes), so one relay holds 7,500 nodes and their pods in a few
hundred MB. Labels are kept whole (agents key on team and pool labels);
annotations only under the configured prefixes (the fleetkeeper domain by
default), which drops ``kubectl.kubernetes.io/last-applied-configuration``
and other bulk.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetkeeper.core.domain import GPU_RESOURCE


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

    def _annotations(self, d: dict | None) -> dict[str, str]:
        if not d:
            return {}
        return {k: v for k, v in d.items() if k.startswith(self.annotation_prefixes)}

    def pod(self, obj: dict) -> AgentPod:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        doc = {
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta.get("uid", ""),
            "ip": status.get("podIP", "") if not spec.get("hostNetwork") else "",
            "phase": status.get("phase", "Pending"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": self._annotations(meta.get("annotations")),
        }
        if meta.get("deletionTimestamp"):
            doc["deleting"] = True
        return AgentPod(spec.get("nodeName", ""), meta.get("resourceVersion", ""), doc)

    def node(self, obj: dict) -> AgentNode:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        alloc = status.get("allocatable") or {}
        doc = {
            "name": meta["name"],
            "uid": meta.get("uid", ""),
            "labels": dict(meta.get("labels") or {}),
            "annotations": self._annotations(meta.get("annotations")),
            "taints": [{"key": t["key"], "value": t.get("value", ""), "effect": t["effect"]}
                       for t in spec.get("taints") or ()],
            "unschedulable": bool(spec.get("unschedulable")),
            # condition heartbeats change every few seconds; only the state is kept,
            # so a heartbeat alone is not fanned out to the agent
            "conditions": [{"type": c["type"], "status": c.get("status", "Unknown"), "reason": c.get("reason", "")}
                           for c in status.get("conditions") or ()],
            "gpus": alloc.get(GPU_RESOURCE, "0"),
        }
        return AgentNode(meta["name"], meta.get("resourceVersion", ""), doc)

    @staticmethod
    def teams(obj: dict) -> TeamConfig:
        meta = obj["metadata"]
        return TeamConfig(meta.get("resourceVersion", ""),
                          {"name": meta["name"], "namespace": meta.get("namespace", ""),
                           "data": dict(obj.get("data") or {})})
