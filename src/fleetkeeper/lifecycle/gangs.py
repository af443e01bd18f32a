"""Gangs in remediation (pure).

A training job is a gang: when one member's node must be drained, the other
members hang on the lost rank until a timeout. So the drain evicts every
member of the gang together (the job restarts at once) and the budget counts
that as the one disruption of the failing node.

A pod's gang, in order: the in-tree ``spec.schedulingGroup.podGroupName``
(Workload/PodGroup, scheduling.k8s.io), the Coscheduling label
``scheduling.x-k8s.io/pod-group``, the capacity component's ``<domain>/gang``
label. A gang is named ``<namespace>/<group>``.

A job may ask for a checkpoint grace (pod annotation
``<domain>/checkpoint-grace: 10m``): non-urgent remediation waits that long
after the drain began before evicting, never past the drain deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fleetkeeper.core.config import parse_duration
from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import PodView
from fleetkeeper.lifecycle.keys import RecordKeys

COSCHED_LABEL = "scheduling.x-k8s.io/pod-group"


def gang_of(pod: PodView, names: Names) -> str:
    group = pod.pod_group or pod.labels.get(COSCHED_LABEL) or pod.labels.get(names.gang) or ""
    return f"{pod.namespace}/{group}" if group else ""


def gang_index(names: Names) -> Callable[[PodView], tuple[str, ...]]:
    """An informer index function: pods by gang."""
    def fn(p: PodView) -> tuple[str, ...]:
        g = gang_of(p, names)
        return (g,) if g else ()
    return fn


def evictable(p: PodView) -> bool:
    return p.phase not in ("Succeeded", "Failed") and p.owner_kind not in ("DaemonSet", "Node") and not p.deleting


def gang_evictions(on_node: Iterable[PodView], members: Callable[[str], list[PodView]], names: Names
                   ) -> tuple[list[PodView], list[str]]:
    """(pods to evict, gangs involved): the node's own evictable pods plus every live member, on any node,
    of a gang that has a member on the node. Each pod once."""
    out: dict[str, PodView] = {}
    gangs: list[str] = []
    for p in on_node:
        if not evictable(p):
            continue
        out[p.key] = p
        g = gang_of(p, names)
        if g and g not in gangs:
            gangs.append(g)
    for g in gangs:
        for m in members(g):
            if evictable(m) and m.node:
                out.setdefault(m.key, m)
    return list(out.values()), gangs


def checkpoint_wait(pods: Iterable[PodView], names: Names, drain_began: float, now: float, deadline: float) -> float:
    """Seconds still to wait for the longest checkpoint grace any pod asked for (0: evict now). Never past
    ``deadline`` (absolute time)."""
    key = RecordKeys(names).checkpoint_grace
    grace = 0.0
    for p in pods:
        raw = p.annotations.get(key)
        if not raw:
            continue
        try:
            grace = max(grace, parse_duration(raw))
        except ValueError:
            continue
    until = min(drain_began + grace, deadline)
    return max(0.0, until - now)
