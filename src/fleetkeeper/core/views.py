"""Projections: the few fields of Nodes and Pods that fleetkeeper's
controllers read, kept instead of whole objects (a Node object is ~10 KB of
JSON; a NodeView a few hundred bytes). Every component shares these
projections, so the manager keeps one informer per resource.

Only labels and annotations under ``keep_prefixes`` (the fleetkeeper domain,
well-known topology keys, KWOK's) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fleetkeeper.core.domain import GPU_RESOURCE


def parse_time(s: str | None) -> float:
    if not s:
        return 0.0
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _quantity_int(v: str | int | None) -> int:
    if v is None:
        return 0
    try:
        return int(v)
    except ValueError:
        return 0


def _cpu_millis(v: str | None) -> int:
    if not v:
        return 0
    if v.endswith("m"):
        return int(v[:-1])
    return int(float(v) * 1000)


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str
    effect: str
    time_added: str = ""  # spec.taints[].timeAdded (NoExecute taints): kept so a rewrite of the list keeps it


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str
    last_transition: float


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    uid: str
    resource_version: str
    labels: dict[str, str]
    annotations: dict[str, str]
    taints: tuple[Taint, ...]
    unschedulable: bool
    conditions: tuple[Condition, ...]
    gpus: int
    cpu_millis: int
    created: float
    deleting: bool

    @property
    def ready(self) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in self.conditions)

    def condition(self, type_: str) -> Condition | None:
        for c in self.conditions:
            if c.type == type_:
                return c
        return None

    def taint(self, key: str) -> Taint | None:
        for t in self.taints:
            if t.key == key:
                return t
        return None


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str
    operator: str
    value: str
    effect: str


@dataclass(frozen=True, slots=True)
class PodView:
    namespace: str
    name: str
    uid: str
    resource_version: str
    node: str
    phase: str
    priority: int
    priority_class: str
    labels: dict[str, str]
    annotations: dict[str, str]
    owner_kind: str
    owner_name: str
    tolerations: tuple[Toleration, ...]
    gpus: int
    deleting: bool
    created: float
    scheduled_reason: str
    scheduled_message: str
    termination_message: str
    pod_ip: str
    scheduler_name: str
    pod_group: str = ""  # spec.schedulingGroup.podGroupName (in-tree gang scheduling)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def active(self) -> bool:
        return self.phase not in ("Succeeded", "Failed") and not self.deleting


class Projector:
    """Builds views, keeping only labels/annotations under the given prefixes."""

    def __init__(self, keep_prefixes: tuple[str, ...]):
        self.keep = keep_prefixes

    def _filter(self, d: dict | None) -> dict[str, str]:
        if not d:
            return {}
        return {k: v for k, v in d.items() if k.startswith(self.keep)}

    def node(self, obj: dict) -> NodeView:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        alloc = status.get("allocatable") or {}
        return NodeView(
            name=meta["name"], uid=meta.get("uid", ""), resource_version=meta.get("resourceVersion", ""),
            labels=self._filter(meta.get("labels")), annotations=self._filter(meta.get("annotations")),
            taints=tuple(Taint(t["key"], t.get("value", ""), t["effect"], t.get("timeAdded") or "")
                         for t in spec.get("taints") or ()),
            unschedulable=bool(spec.get("unschedulable")),
            conditions=tuple(
                Condition(c["type"], c.get("status", "Unknown"), c.get("reason", ""), c.get("message", ""),
                          parse_time(c.get("lastTransitionTime")))
                for c in status.get("conditions") or ()
            ),
            gpus=_quantity_int(alloc.get(GPU_RESOURCE)), cpu_millis=_cpu_millis(alloc.get("cpu")),
            created=parse_time(meta.get("creationTimestamp")), deleting=bool(meta.get("deletionTimestamp")),
        )

    def pod(self, obj: dict) -> PodView:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        owners = meta.get("ownerReferences") or [{}]
        owner = next((o for o in owners if o.get("controller")), owners[0])
        gpus = 0
        for c in spec.get("containers") or ():
            gpus += _quantity_int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE))
        sched = next((c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"), {})
        term = ""
        for cs in status.get("containerStatuses") or ():
            t = (cs.get("state") or {}).get("terminated")
            if t and t.get("message"):
                term = t["message"]
                break
        return PodView(
            namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""), node=spec.get("nodeName", ""),
            phase=status.get("phase", "Pending"), priority=int(spec.get("priority") or 0),
            priority_class=spec.get("priorityClassName", ""),
            labels=self._filter(meta.get("labels")), annotations=self._filter(meta.get("annotations")),
            owner_kind=owner.get("kind", ""), owner_name=owner.get("name", ""),
            tolerations=tuple(Toleration(t.get("key", ""), t.get("operator", "Equal"), t.get("value", ""),
                                         t.get("effect", "")) for t in spec.get("tolerations") or ()),
            gpus=gpus, deleting=bool(meta.get("deletionTimestamp")),
            created=parse_time(meta.get("creationTimestamp")),
            scheduled_reason=sched.get("reason", "") if sched.get("status") != "True" else "",
            scheduled_message=sched.get("message", "") if sched.get("status") != "True" else "",
            termination_message=term, pod_ip=status.get("podIP", ""),
            scheduler_name=spec.get("schedulerName", ""),
            pod_group=(spec.get("schedulingGroup") or {}).get("podGroupName", ""),
        )


def default_projector(domain: str) -> Projector:
    return Projector((f"{domain}/", "topology.kubernetes.io/", "node.kubernetes.io/", "kubernetes.io/hostname",
                      "type", "kwok.x-k8s.io/", "app", "job-name", "batch.kubernetes.io/",
                      "statefulset.kubernetes.io/", "scheduling.k8s.io/", "scheduling.x-k8s.io/"))
