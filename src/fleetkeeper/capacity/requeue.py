"""Repair a gang kube-scheduler has stopped trying. Pure decisions.

kube-scheduler v1.36 can leave every unplaced member of a pod group in its
queue's unschedulable pool for good (docs/capacity.md, "the gang stall"): a
member whose preemption was started in a pod group cycle that then failed is
re-queued while that preemption is still running, so DefaultPreemption's
PreEnqueue holds it; its only rejector is then DefaultPreemption, whose
queueing hint for the victim's deletion is always "skip", and held pods are
never flushed. Nothing that happens to nodes, pods or the PodGroup moves it.

What does move it: a pod group cycle of the same group. A cycle pops every
unscheduled member of the group from the queue and runs PreEnqueue on each
again (the preemption has long finished, so they pass). A cycle starts when
any member is popped, so fleetkeeper creates one more pod of the group that
passes PreEnqueue (a **requeue pod**: no resources, a node selector no node
matches, so it is never placed). The scheduler pops it within a moment, the
cycle takes the stuck members along and places the gang if it fits. The
requeue pod is deleted as soon as the scheduler has tried it (it has a
``PodScheduled`` condition), or when its gang is placed or gone.

When: a gang that fits its pool now (yielding's simulation placed it whole)
and has stayed unplaced for ``after`` seconds. A healthy gang is retried
within the scheduler's maximum backoff (10 s by default), so ``after`` above
that only catches stuck ones; a false alarm costs one extra pod group cycle.
At most one requeue pod per gang at a time and one per gang per ``after``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetkeeper.core.domain import Names

from fleetkeeper.capacity.yielding import Unit, WaitingPod, requeue_label

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


@dataclass
class RequeuePlan:
    create: list[tuple[str, str, float]] = field(default_factory=list)  # (namespace, group, seconds it fitted)
    delete: list[tuple[str, str, str]] = field(default_factory=list)  # (namespace, pod, why)
    fits_since: dict[str, float] = field(default_factory=dict)  # unit key -> first seen fitting (carry over)


def decide(units: list[Unit], fitting: set[str], probes: list[WaitingPod], fits_since: dict[str, float],
           last_requeue: dict[str, float], now: float, after: float | None) -> RequeuePlan:
    """``units``: the waiting units; ``fitting``: keys of those that fit now; ``probes``: the requeue
    pods that exist (unbound pods labelled :func:`yielding.requeue_label`); ``fits_since`` and
    ``last_requeue``: what the previous passes saw (unit key -> time); ``now``: wall clock."""
    plan = RequeuePlan()
    waiting = {u.key: u for u in units}
    for key in fitting:
        if key in waiting:
            plan.fits_since[key] = fits_since.get(key, now)
    live: set[str] = set()
    for p in probes:
        if p.deleting:
            live.add(f"{p.namespace}/{p.requeue_for}")
            continue
        key = f"{p.namespace}/{p.requeue_for}"
        if key not in waiting:
            plan.delete.append((p.namespace, p.name, "its gang is placed or gone"))
        elif p.unschedulable:
            plan.delete.append((p.namespace, p.name, "the scheduler tried it (the group's cycle ran)"))
        elif after is not None and now - p.created >= 3 * after:
            plan.delete.append((p.namespace, p.name, "not tried by the scheduler in time"))
        else:
            live.add(key)
    if after is None:
        return plan
    for key, since in sorted(plan.fits_since.items()):
        u = waiting[key]
        group = u.pods[0].group
        if not group or key in live:
            continue
        if now - since >= after and now - last_requeue.get(key, -1e18) >= after:
            plan.create.append((u.pods[0].namespace, group, now - since))
    return plan


def requeue_pod(namespace: str, group: str, names: Names) -> dict:
    """One more pod of ``group`` that kube-scheduler tries at once and never places."""
    label = requeue_label(names)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": f"{group[:40]}-requeue-", "namespace": namespace,
            "labels": {label: group, names.managed_by: "capacity"},
            "annotations": {f"{names.domain}/why": (
                "makes kube-scheduler run a pod group cycle of this gang, whose members it stopped retrying; "
                "never placed (no node has the selected label); fleetkeeper deletes it once tried")},
        },
        "spec": {
            "schedulingGroup": {"podGroupName": group},
            "nodeSelector": {label: "never-placed"},
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "containers": [{"name": "requeue", "image": PAUSE_IMAGE,
                            "resources": {"requests": {"cpu": "1m", "memory": "1Mi"},
                                          "limits": {"cpu": "1m", "memory": "1Mi"}}}],
        },
    }
