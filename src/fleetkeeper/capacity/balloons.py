"""Balloons: pure decisions.

Per pool, one Deployment of low-priority pods, each sized to take a whole
node, one per node (by their request where two cannot fit on any node of the
pool, else by required anti-affinity), that never tolerate the preflight or
quarantine taints.
Real work (priority >= 0) preempts a balloon at once; the ReplicaSet
re-creates it and it lands on another free node of the pool or waits Pending
(which is what makes cluster-autoscaler keep the pool at its maximum).

:func:`decide` maps (config, nodes, balloon pods) to a :class:`BalloonPlan`
with the objects to apply, the balloons to remove from nodes that must not
carry them, and the figures the metrics report. No I/O, no clock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fleetkeeper.core.domain import GPU_RESOURCE, HOSTNAME_LABEL, Names
from fleetkeeper.core.views import NodeView, PodView

from fleetkeeper.capacity.config import BalloonConfig, PoolConfig

MANAGER = "capacity"


def deployment_name(pool: str) -> str:
    return f"balloon-{pool}"


def balloon_label(names: Names) -> str:
    return names.balloon


@dataclass(frozen=True)
class PoolSizing:
    pool: str
    resource: str  # "nvidia.com/gpu" or "cpu"
    per_balloon: float  # GPUs, or CPU cores
    request: dict[str, str]  # container requests (= limits)
    replicas: int
    nodes: int  # nodes currently in the pool
    problem: str = ""  # why the pool cannot be sized (then nothing is applied)
    # the request alone keeps balloons one per node (two do not fit on any node of the pool), so the Deployment
    # needs no required anti-affinity, which kube-scheduler pays for against every existing balloon
    exclusive: bool = False


@dataclass(frozen=True)
class Eviction:
    namespace: str
    name: str
    pool: str
    node: str
    reason: str


@dataclass(frozen=True)
class PoolStatus:
    pool: str
    resource: str
    desired: int
    running: int
    pending: int
    idle_capacity: float  # resource units held by running balloons
    blocked_nodes: tuple[str, ...]  # pool nodes balloons may not use (preflight, quarantine)


@dataclass
class BalloonPlan:
    priority_class: dict | None = None
    deployments: list[dict] = field(default_factory=list)
    delete_deployments: list[str] = field(default_factory=list)
    evictions: list[Eviction] = field(default_factory=list)
    status: list[PoolStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _mode(values: list[int]) -> int:
    values = [v for v in values if v > 0]
    if not values:
        return 0
    return Counter(values).most_common(1)[0][0]


def size_pool(pool: PoolConfig, nodes: list[NodeView]) -> PoolSizing:
    """How big one balloon of this pool is, and how many there should be."""
    replicas = pool.max_nodes if pool.max_nodes is not None else len(nodes)
    if pool.resource == "gpu":
        gpus = pool.gpus or _mode([n.gpus for n in nodes])
        if not gpus:
            return PoolSizing(pool.name, GPU_RESOURCE, 0, {}, replicas, len(nodes),
                              problem=f"pool {pool.name}: no node reports {GPU_RESOURCE} and 'gpus' is not set")
        return PoolSizing(pool.name, GPU_RESOURCE, float(gpus), {GPU_RESOURCE: str(gpus), "cpu": "10m",
                                                                   "memory": "16Mi"}, replicas, len(nodes),
                          exclusive=bool(nodes) and all(n.gpus < 2 * gpus for n in nodes))
    millis = _mode([n.cpu_millis for n in nodes])
    if not millis:
        return PoolSizing(pool.name, "cpu", 0, {}, replicas, len(nodes),
                          problem=f"pool {pool.name}: no node of the pool reports allocatable cpu to size from")
    want = int(millis * pool.cpu_fraction) // 100 * 100
    want = max(100, want)
    return PoolSizing(pool.name, "cpu", want / 1000, {"cpu": f"{want}m", "memory": "16Mi"}, replicas, len(nodes),
                      exclusive=bool(nodes) and all(n.cpu_millis < 2 * want for n in nodes))


def priority_class(cfg: BalloonConfig, names: Names) -> dict:
    return {
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
        "metadata": {"name": cfg.priority_class, "labels": {names.managed_by: MANAGER}},
        "value": cfg.priority, "globalDefault": False, "preemptionPolicy": "Never",
        "description": "fleetkeeper balloons: placeholders that any real work preempts",
    }


def deployment(sizing: PoolSizing, cfg: BalloonConfig, names: Names, namespace: str,
               replicas: int | None = None) -> dict:
    """The balloon Deployment of one pool (server-side applied as a whole).
    ``replicas``: held below the pool's size while work waits for its room."""
    sel = {balloon_label(names): sizing.pool}
    tolerations: list[dict] = []
    if cfg.tolerate_team_taints:
        tolerations.append({"key": names.team, "operator": "Exists", "effect": "NoSchedule"})
    forbidden = (names.preflight, names.quarantine)
    tolerations.extend(dict(t) for t in cfg.tolerations if t.get("key") not in forbidden)
    pod_spec = {
        "priorityClassName": cfg.priority_class,
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": names.pool, "operator": "In", "values": [sizing.pool]}]}]}},
        },
        "containers": [{
            "name": "balloon", "image": cfg.image,
            "resources": {"requests": dict(sizing.request), "limits": dict(sizing.request)},
        }],
    }
    if not sizing.exclusive:  # a node could take two balloons by their request: keep one per node
        pod_spec["affinity"]["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": sel}, "topologyKey": HOSTNAME_LABEL}]}
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": deployment_name(sizing.pool), "namespace": namespace,
                     "labels": {**sel, names.managed_by: MANAGER},
                     "annotations": {f"{names.domain}/balloon-size": f"{sizing.per_balloon:g} {sizing.resource}"}},
        "spec": {
            "replicas": sizing.replicas if replicas is None else min(replicas, sizing.replicas),
            "selector": {"matchLabels": sel},
            # a preempted balloon is simply re-created; never hold capacity for a surge
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "100%"}},
            "revisionHistoryLimit": 2,
            "template": {"metadata": {"labels": {**sel, names.managed_by: MANAGER}}, "spec": pod_spec},
        },
    }


def blocked(node: NodeView, names: Names) -> str:
    """Why a balloon must not sit on this node ('' if it may)."""
    for key in (names.preflight, names.quarantine):
        t = node.taint(key)
        if t is not None:
            return f"taint {t.key}={t.value}:{t.effect}"
    return ""


def decide(cfg: BalloonConfig, names: Names, namespace: str, nodes: list[NodeView], pods: list[PodView],
           existing_deployments: list[str] = (), hold: dict[str, int] | None = None) -> BalloonPlan:
    """Everything the balloon manager should do now. ``hold``: pool -> replicas
    while work waits for the pool's room (see :mod:`yielding`)."""
    plan = BalloonPlan()
    label = balloon_label(names)
    wanted: set[str] = set()
    by_name = {n.name: n for n in nodes}
    if cfg.enabled:
        plan.priority_class = priority_class(cfg, names)
    for pool in cfg.pools:
        pool_nodes = [n for n in nodes if n.labels.get(names.pool) == pool.name and not n.deleting]
        sizing = size_pool(pool, pool_nodes)
        if not cfg.enabled or not pool.enabled:
            continue
        wanted.add(deployment_name(pool.name))
        members = [p for p in pods if p.labels.get(label) == pool.name and p.namespace == namespace and p.active]
        running = [p for p in members if p.node and p.phase == "Running"]
        bad_nodes = tuple(sorted(n.name for n in pool_nodes if blocked(n, names)))
        if sizing.problem:
            plan.problems.append(sizing.problem)
        else:
            plan.deployments.append(deployment(sizing, cfg, names, namespace, (hold or {}).get(pool.name)))
        for p in members:
            node = by_name.get(p.node)
            why = blocked(node, names) if node else ""
            if why:
                plan.evictions.append(Eviction(p.namespace, p.name, pool.name, p.node, why))
        plan.status.append(PoolStatus(
            pool=pool.name, resource=sizing.resource or ("nvidia.com/gpu" if pool.resource == "gpu" else "cpu"),
            desired=sizing.replicas, running=len(running), pending=sum(1 for p in members if not p.node),
            idle_capacity=len(running) * sizing.per_balloon, blocked_nodes=bad_nodes,
        ))
    plan.delete_deployments = sorted(d for d in existing_deployments if d not in wanted)
    return plan
