"""``fleetkeeper explain node NAME``: health conditions, history and the next step."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import CONFIGMAPS, NODES, PODS, Kube
from fleetkeeper.core.views import default_projector
from fleetkeeper.health.decide import Keys, classify, decide_node, history_read, watched_types
from fleetkeeper.health.policy import Policy, load_policy

CONFIGMAP = "fleetkeeper-health"


async def load_cluster_policy(kube: Kube, namespace: str = "fleetkeeper-system") -> tuple[Policy, str]:
    try:
        cm = await kube.get_or_none(CONFIGMAPS, CONFIGMAP, namespace)
    except errors.Forbidden:
        cm = None
    text = ((cm or {}).get("data") or {}).get("policy.yaml")
    src = f"configmap {namespace}/{CONFIGMAP}" if text else "built-in defaults"
    return load_policy(text, src), src


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


async def explain_node(kube: Kube, names: Names, node_name: str) -> list[str]:
    raw = await kube.get_or_none(NODES, node_name)
    if raw is None:
        return []
    policy, src = await load_cluster_policy(kube)
    proj = default_projector(names.domain)
    node = proj.node(raw)
    pods_raw, _ = await kube.list(PODS, field_selector=f"spec.nodeName={node_name}")
    pods = [proj.pod(p) for p in pods_raw]
    now = time.time()
    k = Keys(names)
    lines = []
    watched = watched_types(policy)
    for c in node.conditions:
        if c.type in watched:
            lines.append(f"condition {c.type}={c.status} {c.reason}: {c.message} (since {_when(c.last_transition)})")
    h = classify(node, policy, now)
    for p in h.active:
        lines.append(f"problem {p.label}: remedy {p.remedy} -> action {p.action}")
    for p in h.pending:
        lines.append(f"problem {p.label}: pending, acts after {p.trigger_after:.0f}s sustained")
    if h.missing:
        lines.append(f"no agent condition for {', '.join(sorted(h.missing))} (unknown: never counted as healthy)")
    a = node.annotations
    if node.taint(names.quarantine):
        lines.append(f"quarantined since {_when(float(a.get(k.since) or 0))}: ladder target "
                     f"{a.get(k.action, '?')}, fixable by {a.get(k.remedy, '?')} ({a.get(k.reason, '')})")
    if a.get(k.state) == "validating":
        lines.append("handed to the preflight gate; returns to service when validation passes")
    for ts, text in history_read(a.get(k.history)):
        lines.append(f"history {_when(ts)} {text}")
    plan = decide_node(node, pods, policy, names, now)
    nxt = {"noop": "nothing to do", "wait": f"wait ({plan.wait}): {plan.why}",
           "quarantine": f"quarantine (budget permitting): {plan.why}", "evict": f"evict {len(plan.pods)} pod(s)",
           "terminate": f"terminate the machine: {plan.why}", "return": "hand over to the preflight gate",
           "release": f"return to service: {plan.why}"}.get(plan.kind, f"{plan.kind}: {plan.why}")
    lines.append(f"next step: {nxt} (policy: {src})")
    return lines
