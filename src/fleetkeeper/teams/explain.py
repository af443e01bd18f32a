"""``fleetkeeper explain node|pod``: the teams part."""

from __future__ import annotations

from fleetkeeper.core.domain import SYSTEM_NAMESPACE, Names
from fleetkeeper.core.kube import PODS, Kube

from fleetkeeper.teams import plan as planmod
from fleetkeeper.teams.admission import ANY, borrower_label, coverage
from fleetkeeper.teams.live import load


async def explain_node(kube: Kube, names: Names, node_name: str, namespace: str = SYSTEM_NAMESPACE) -> list[str]:
    live = await load(kube, names, namespace)
    state = next((s for s in live.states if s.name == node_name), None)
    if state is None:
        return [f"no node {node_name}"]
    lines = []
    if live.config is None:
        lines.append(f"team configuration unavailable: {live.config_error.splitlines()[0]}")
        if state.team:
            lines.append(f"carries team {state.team}; nothing changes until the configuration is valid")
        return lines
    if live.config_error:
        lines.append(f"the ConfigMap is invalid; the controller keeps its last good configuration: "
                     f"{live.config_error.splitlines()[0]}")
    assert live.plan is not None
    lines += planmod.explain_node(live.plan, live.config, state, live.states)
    return lines


async def explain_pod(kube: Kube, names: Names, namespace: str, name: str,
                      system_namespace: str = SYSTEM_NAMESPACE) -> list[str]:
    pod = await kube.get_or_none(PODS, name, namespace)
    if pod is None:
        return [f"no pod {namespace}/{name}"]
    live = await load(kube, names, system_namespace)
    tols = (pod.get("spec") or {}).get("tolerations") or []
    cov = {c for c in (coverage(t, names.team) for t in tols) if c}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    prio = (pod.get("spec") or {}).get("priority", 0)
    lines = []
    if labels.get(names.team):
        lines.append(f"submitted for team {labels[names.team]} (set by the webhook from the submitter's identity)")
    if borrower_label(names) in labels:
        lines.append(f"low priority ({prio}): a borrower, submitted by a member of {labels[borrower_label(names)]}")
    by_team: dict[str, int] = {}
    free = 0
    for s in live.states:
        if s.team:
            by_team[s.team] = by_team.get(s.team, 0) + 1
        elif s.eligible:
            free += 1
    lines.append(f"may run on the {free} healthy untainted node(s) (shared capacity)")
    if ANY in cov:
        lines.append(f"tolerates every team's taint: may borrow idle nodes of {', '.join(sorted(by_team)) or 'any team'}; "
                     "the owning team's pods preempt it when they need the node")
    else:
        for t in sorted(cov):
            lines.append(f"tolerates team {t}: may run on its {by_team.get(t, 0)} node(s)")
        others = sorted(t for t in by_team if t not in cov)
        if others:
            lines.append("may not run on nodes of " + ", ".join(f"{t} ({by_team[t]})" for t in others)
                         + f": they carry {names.team}=<team>:NoSchedule and the pod has no matching toleration")
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        s = next((x for x in live.states if x.name == node), None)
        lines.append(f"runs on {node} (team {s.team if s and s.team else 'none'})")
    return lines
