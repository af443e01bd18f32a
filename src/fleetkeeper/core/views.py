"""Projections: the few fields of Nodes and Pods that fleetkeeper's
controllers read, kept instead of whole objects (a Node object is ~10 KB of
JSON; a NodeView a few hundred bytes). Every component shares these
projections, so the manager keeps one informer per resource.

Only labels and annotations under ``keep_prefixes`` (the fleetkeeper domain,
well-known topology keys, KWOK's) are kept.

Strings that repeat across objects (namespaces, phases, node names in pods,
label keys and values, condition types, reasons and messages, taint and
toleration fields) are interned (:func:`sys.intern`), and identical
tolerations and taints are one shared tuple: every decoded object brings its
own copy of each string, and at 20,000 pods and 7,500 nodes the copies cost
more than the views.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime

from fleetkeeper.core.domain import GPU_RESOURCE


intern = sys.intern

# identical tuples of tolerations / taints shared by every view that has them
_SHARED_MAX = 4096


class SharedValues:
    """A bounded table of values shared by every view that has an equal one: ``get(v)`` returns the one
    kept equal to ``v`` (an immutable value is its own key); ``get(key, make)`` the one kept for ``key``,
    made once (for values that cannot be keys, such as the relay's lists of dicts)."""

    def __init__(self, limit: int = _SHARED_MAX):
        self.limit = limit
        self._by: dict = {}

    def get(self, key, make=None):
        kept = self._by.get(key)
        if kept is not None:
            return kept
        if len(self._by) >= self.limit:
            self._by.clear()
        kept = self._by[key] = key if make is None else make()
        return kept


def intern_dict(d: dict[str, str], keep: tuple[str, ...] | None = None) -> dict[str, str]:
    """A copy of a str -> str map with keys and values interned (non-strings kept as they are); with
    ``keep``, only the keys that start with one of those prefixes."""
    return {intern(k): intern(v) if type(v) is str else v for k, v in d.items()
            if keep is None or k.startswith(keep)}


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
    try:
        if v.endswith("m"):
            return int(v[:-1])
        return int(float(v) * 1000)
    except ValueError:
        return 0


def requested_cpu_millis(spec: dict) -> int:
    """CPU a pod's containers request (a limit without a request is the request, as the API server
    defaults it)."""
    total = 0
    for c in spec.get("containers") or ():
        res = c.get("resources") or {}
        total += _cpu_millis(str(v) if (v := (res.get("requests") or {}).get("cpu")
                                        or (res.get("limits") or {}).get("cpu")) is not None else None)
    return total


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
    cpu_millis: int = 0  # CPU the containers request (a limit without a request counts as the request)

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
        self._shared = SharedValues()

    def _filter(self, d: dict | None) -> dict[str, str]:
        if not d:
            return {}
        return intern_dict(d, self.keep)

    def node(self, obj: dict) -> NodeView:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        alloc = status.get("allocatable") or {}
        return NodeView(
            name=intern(meta["name"]), uid=meta.get("uid", ""), resource_version=meta.get("resourceVersion", ""),
            labels=self._filter(meta.get("labels")), annotations=self._filter(meta.get("annotations")),
            taints=self._shared.get(tuple(
                Taint(intern(t["key"]), intern(t.get("value", "")), intern(t["effect"]), t.get("timeAdded") or "")
                for t in spec.get("taints") or ())),
            unschedulable=bool(spec.get("unschedulable")),
            conditions=tuple(
                Condition(intern(c["type"]), intern(c.get("status", "Unknown")), intern(c.get("reason", "")),
                          intern(c.get("message", "")), parse_time(c.get("lastTransitionTime")))
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
            namespace=intern(meta["namespace"]), name=meta["name"], uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""), node=intern(spec.get("nodeName", "")),
            phase=intern(status.get("phase", "Pending")), priority=int(spec.get("priority") or 0),
            priority_class=intern(spec.get("priorityClassName", "")),
            labels=self._filter(meta.get("labels")), annotations=self._filter(meta.get("annotations")),
            owner_kind=intern(owner.get("kind", "")), owner_name=owner.get("name", ""),
            tolerations=self._shared.get(tuple(
                Toleration(intern(t.get("key", "")), intern(t.get("operator", "Equal")), intern(t.get("value", "")),
                           intern(t.get("effect", ""))) for t in spec.get("tolerations") or ())),
            gpus=gpus, deleting=bool(meta.get("deletionTimestamp")),
            created=parse_time(meta.get("creationTimestamp")),
            scheduled_reason=intern(sched.get("reason", "")) if sched.get("status") != "True" else "",
            scheduled_message=sched.get("message", "") if sched.get("status") != "True" else "",
            termination_message=term, pod_ip=status.get("podIP", ""),
            scheduler_name=intern(spec.get("schedulerName", "")),
            pod_group=(spec.get("schedulingGroup") or {}).get("podGroupName", ""),
            cpu_millis=requested_cpu_millis(spec),
        )


def default_projector(domain: str) -> Projector:
    return Projector((f"{domain}/", "topology.kubernetes.io/", "node.kubernetes.io/", "kubernetes.io/hostname",
                      "type", "kwok.x-k8s.io/", "app", "job-name", "batch.kubernetes.io/",
                      "statefulset.kubernetes.io/", "scheduling.k8s.io/", "scheduling.x-k8s.io/"))
