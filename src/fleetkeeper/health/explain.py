"""``fleetkeeper explain node NAME``: health conditions, history and the next step."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import CONFIGMAPS, NODES, PODS, Kube
from fleetkeeper.core.views import default_projector
from fleetkeeper.health.decide import Keys, classify, decide_node, evictable, history_read, watched_types
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
    waiting: tuple[str, ...] = ()
    window = a.get(k.window)
    if window:  # the other nodes of its gang repair window (rare: listing the nodes is fine here)
        items, _ = await kube.list(NODES)
        others = [n["metadata"]["name"] for n in items if n["metadata"]["name"] != node_name
                  and (n["metadata"].get("annotations") or {}).get(k.window) == window]
        left = []
        for o in others:
            ps, _ = await kube.list(PODS, field_selector=f"spec.nodeName={o}")
            if any(evictable([proj.pod(p) for p in ps])[0]):
                left.append(o)
        waiting = tuple(left)
        lines.append(f"in the gang repair window {window} with {', '.join(others) or 'no other node'}; "
                     f"repaired together once all are drained" + (f" (still draining: {', '.join(left)})"
                                                                  if left else ""))
    plan = decide_node(node, pods, policy, names, now, window_waiting=waiting)
    nxt = {"noop": "nothing to do", "wait": f"wait ({plan.wait}): {plan.why}",
           "quarantine": f"quarantine (budget permitting): {plan.why}"
                         + (f"; {plan.request} in the same write" if plan.request else ""),
           "evict": f"evict {len(plan.pods)} pod(s)",
           "terminate": f"terminate the machine: {plan.why}", "return": "hand over to the preflight gate",
           "release": f"return to service: {plan.why}"}.get(plan.kind, f"{plan.kind}: {plan.why}")
    lines.append(f"next step: {nxt} (policy: {src})")
    return lines
