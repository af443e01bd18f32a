"""Periodic re-tests: which idle nodes to test now, which test pods to give up. Pure.

A node is *eligible* when it is in service (not gated, not cordoned, Ready,
no taints but team and PreferNoSchedule ones), matches the selector, has had
no real work for ``min_idle_s``, and its last validation is older than
``start_fraction`` of the period. The most overdue go first, up to
``max_concurrent`` pods in flight. A periodic test pod is given up (deleted)
when real work shows up on its node, or when it ran past its timeout.
Coverage is the share of in-scope nodes validated within the period.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetkeeper.core.views import NodeView, PodView
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.keys import GATE, PERIODIC, Keys

START_FRACTION = 0.75


def is_real_work(pod: PodView, keys: Keys) -> bool:
    """Anything but DaemonSet pods, static/mirror pods, our own test pods and
    balloons (placeholders that keep an idle node warm: the node is idle)."""
    return pod.active and pod.owner_kind not in ("DaemonSet", "Node") and keys.pod_kind not in pod.labels \
        and keys.names.balloon not in pod.labels


def last_validated(node: NodeView, keys: Keys) -> float:
    try:
        return float(node.annotations.get(keys.validated_at) or 0)
    except ValueError:
        return 0.0


def baseline(node: NodeView, keys: Keys) -> float:
    """When the node's clock for re-testing started: last validation, else its creation."""
    return last_validated(node, keys) or node.created


def in_service(node: NodeView, keys: Keys) -> bool:
    if node.deleting or node.unschedulable or not node.ready:
        return False
    if node.taint(keys.gate) or keys.gate in node.labels:
        return False
    return all(t.effect == "PreferNoSchedule" or t.key == keys.names.team for t in node.taints)


@dataclass
class PeriodicPlan:
    start: list[str] = field(default_factory=list)  # node names
    give_up: list[tuple[str, str]] = field(default_factory=list)  # (pod name, why)
    in_scope: int = 0
    covered: int = 0
    oldest_age: float = 0.0
    eligible: int = 0
    in_flight: int = 0

    @property
    def coverage(self) -> float:
        return self.covered / self.in_scope if self.in_scope else 1.0


def decide(nodes: list[NodeView], pods_by_node: dict[str, list[PodView]], last_busy: dict[str, float],
           cfg: PreflightConfig, keys: Keys, now: float) -> PeriodicPlan:
    pc = cfg.periodic
    plan = PeriodicPlan()
    candidates: list[tuple[float, str]] = []
    for node in nodes:
        if not all(node.labels.get(k) == v for k, v in {**cfg.node_selector, **pc.node_selector}.items()):
            continue
        pods = pods_by_node.get(node.name, [])
        mine = [p for p in pods if p.labels.get(keys.pod_kind) == PERIODIC and p.active]
        busy = any(is_real_work(p, keys) for p in pods)
        for p in mine:
            plan.in_flight += 1
            if busy:
                plan.give_up.append((p.name, "real work arrived on the node"))
            elif now - p.created > pc.pod_timeout_s:
                plan.give_up.append((p.name, f"did not finish within {pc.pod_timeout_s:.0f}s ({p.phase})"))
            elif not in_service(node, keys):
                plan.give_up.append((p.name, "node left service"))
        if node.deleting:
            continue
        plan.in_scope += 1
        age = now - baseline(node, keys)
        if last_validated(node, keys) and now - last_validated(node, keys) <= pc.period_s:
            plan.covered += 1
        plan.oldest_age = max(plan.oldest_age, age)
        if mine or busy or not in_service(node, keys):
            continue
        if any(p.labels.get(keys.pod_kind) == GATE and p.active for p in pods):
            continue
        if now - last_busy.get(node.name, 0.0) < pc.min_idle_s:
            continue
        if age < START_FRACTION * pc.period_s:
            continue
        plan.eligible += 1
        candidates.append((-age, node.name))
    if not pc.enabled:
        return plan
    slots = max(0, pc.max_concurrent - (plan.in_flight - len(plan.give_up)))
    plan.start = [name for _, name in sorted(candidates)[:slots]]
    return plan
