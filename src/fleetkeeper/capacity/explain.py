"""``fleetkeeper explain pod|node``: the capacity view.

For a pod: is it in a gang, how big is the gang, how many members exist and
are placed, what the scheduler said about the group, and what the gang waits
for. For a node: does a balloon hold it (and so is free for real work at
once), or may balloons not use it, and why.
"""

from __future__ import annotations

from fleetkeeper.core.domain import Names
from fleetkeeper.core.errors import NotFound
from fleetkeeper.core.kube import COSCHED_PODGROUPS, NODES, PODGROUPS, PODS, WORKLOADS, Kube
from fleetkeeper.core.views import default_projector

from fleetkeeper.capacity import balloons as bl
from fleetkeeper.capacity import gangs as gg


async def explain_pod(kube: Kube, names: Names, namespace: str, name: str) -> list[str]:
    pod = await kube.get_or_none(PODS, name, namespace)
    if pod is None:
        return []
    labels = pod["metadata"].get("labels") or {}
    if labels.get(bl.balloon_label(names)):
        return [f"balloon of pool {labels[bl.balloon_label(names)]}: a placeholder at priority "
                f"{pod['spec'].get('priority', '?')} that any real work preempts"]
    member = gg.gang_pod_projector(names)(pod)
    group_name = member.scheduling_group or member.cosched_group or member.gang
    if not group_name:
        return []
    lines = [f"gang {group_name}" + (f" (label {names.gang}={member.gang})" if member.gang else "")]
    if member.gang and not member.scheduling_group and not member.cosched_group:
        lines.append("this pod was created without spec.schedulingGroup (the gang webhook was not active): it is "
                     "scheduled on its own, not with its gang; delete it so its controller recreates it")
    pg = await _get(kube, PODGROUPS, group_name, namespace)
    cs = await _get(kube, COSCHED_PODGROUPS, group_name, namespace)
    group = pg or cs
    if group is None:
        if member.node:
            lines.append(f"no PodGroup {namespace}/{group_name} (any more)")
        elif member.scheduling_group or member.cosched_group:
            lines.append(f"no PodGroup {namespace}/{group_name} yet: the scheduler keeps every member out of its "
                         f"queue until fleetkeeper creates it")
            wl = await _get(kube, WORKLOADS, group_name, namespace) if member.scheduling_group else None
            ann = ((wl or {}).get("metadata") or {}).get("annotations") or {}
            if ann.get(gg.message_annotation(names)):
                lines.append(f"fleetkeeper: {ann.get(gg.state_annotation(names), '')}: "
                             f"{ann[gg.message_annotation(names)]}")
            lines.extend(scheduler_lines(pod, None, names.gang_gate))
        return lines
    min_count = gg.group_min(group) or 0
    items, _ = await kube.list(PODS, namespace, label_selector=f"{names.gang}={member.gang}") if member.gang \
        else ([], "")
    members = [gg.gang_pod_projector(names)(p) for p in items]
    active = [m for m in members if m.active]
    bound = [m for m in active if m.node]
    lines.append(f"minimum members placed together: {min_count}; members: {len(active)} active, "
                 f"{len(bound)} placed, {sum(1 for m in members if m.phase == 'Succeeded')} succeeded, "
                 f"{sum(1 for m in members if m.phase == 'Failed')} failed")
    lines.extend(scheduler_lines(pod, group, names.gang_gate))
    ann = (group["metadata"].get("annotations") or {})
    state = ann.get(gg.state_annotation(names))
    if state:
        lines.append(f"gang state (fleetkeeper): {state}: {ann.get(gg.message_annotation(names), '')}")
    if not member.node and member.active and len(active) < min_count:
        lines.append(f"waiting whole: only {len(active)} of {min_count} members exist (the scheduler keeps every "
                     f"member out of its queue until {min_count} exist)")
    return lines


def scheduler_lines(pod: dict, group: dict | None, own_gate: str = "") -> list[str]:
    """What kube-scheduler itself reported: the pod's PodScheduled condition and
    the PodGroup's conditions, quoted, not inferred; and the pod's scheduling gates."""
    lines: list[str] = []
    for g in (pod.get("spec") or {}).get("schedulingGates") or ():
        name = g.get("name", "")
        lines.append(f"scheduling gate {name}: the scheduler does not look at this pod until it is removed"
                     + (" (fleetkeeper's: removed when the gang is no longer held)" if name == own_gate else ""))
    if group is not None:
        conds = (group.get("status") or {}).get("conditions") or ()
        for c in conds:
            lines.append(f"scheduler on PodGroup: {c.get('type')}={c.get('status')} {c.get('reason', '')}"
                         + (f": {c['message']}" if c.get("message") else "")
                         + (f" (since {c['lastTransitionTime']})" if c.get("lastTransitionTime") else ""))
        if not conds:
            lines.append("scheduler on PodGroup: no conditions yet (no scheduling cycle of this group has finished)")
    sched = next((c for c in (pod.get("status") or {}).get("conditions") or () if c.get("type") == "PodScheduled"),
                 None)
    nominated = (pod.get("status") or {}).get("nominatedNodeName")
    if sched is not None:
        lines.append(f"scheduler on pod: PodScheduled={sched.get('status')} {sched.get('reason', '')}"
                     + (f": {sched['message']}" if sched.get("message") else "")
                     + (f" (since {sched['lastTransitionTime']})" if sched.get("lastTransitionTime") else ""))
    elif not (pod.get("spec") or {}).get("nodeName"):
        lines.append("scheduler on pod: no PodScheduled condition: the scheduler has not tried this pod yet (its "
                     "gang plugin keeps members out of the queue until the PodGroup and enough members exist)")
    if nominated:
        lines.append(f"scheduler on pod: nominated to node {nominated} (waiting for preemption victims to go)")
    return lines


async def explain_node(kube: Kube, names: Names, node_name: str) -> list[str]:
    node = await kube.get_or_none(NODES, node_name)
    if node is None:
        return []
    view = default_projector(names.domain).node(node)
    lines: list[str] = []
    why = bl.blocked(view, names)
    if why:
        lines.append(f"balloons may not use this node ({why}); any balloon here is removed")
    pods, _ = await kube.list(PODS, field_selector=f"spec.nodeName={node_name}",
                              label_selector=bl.balloon_label(names))
    for p in pods:
        pool = (p["metadata"].get("labels") or {}).get(bl.balloon_label(names))
        lines.append(f"balloon {p['metadata']['namespace']}/{p['metadata']['name']} (pool {pool}) holds this node "
                     f"warm: real work preempts it at once")
    if not pods and not why and view.labels.get(names.pool):
        lines.append(f"no balloon on this node (pool {view.labels[names.pool]})")
    return lines


async def _get(kube: Kube, res, name: str, namespace: str) -> dict | None:
    try:
        return await kube.get(res, name, namespace)
    except NotFound:
        return None
