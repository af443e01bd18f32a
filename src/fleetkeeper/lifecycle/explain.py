"""``fleetkeeper explain node NAME`` (its lifecycle part) and ``fleetkeeper budget``:
read-only, the same pure functions the controllers run, so what they print is
what would happen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

import yaml

from fleetkeeper.core import errors
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.domain import SYSTEM_NAMESPACE, Names
from fleetkeeper.core.kube import CONFIGMAPS, NODES, PODS, Kube
from fleetkeeper.core.views import NodeView, PodView, default_projector
from fleetkeeper.lifecycle import budget as bud
from fleetkeeper.lifecycle import machine
from fleetkeeper.lifecycle.config import CONFIG_KEY, CONFIGMAP, BudgetConfig, LifecycleConfig, load_lifecycle
from fleetkeeper.lifecycle.gangs import evictable, gang_evictions, gang_of

HEALTH_CONFIGMAP, HEALTH_KEY = "fleetkeeper-health", "policy.yaml"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


async def load_config(kube: Kube, namespace: str) -> tuple[LifecycleConfig, BudgetConfig, str]:
    """The lifecycle configuration and the budget in force, and where the budget comes from."""
    try:
        cfg = await ConfigMapKey(kube, namespace, CONFIGMAP, CONFIG_KEY, load_lifecycle).load()
    except errors.Forbidden:
        cfg = LifecycleConfig()
    if cfg.budget is not None:
        return cfg, cfg.budget, f"configmap {namespace}/{CONFIGMAP}"
    try:
        cm = await kube.get_or_none(CONFIGMAPS, HEALTH_CONFIGMAP, namespace)
    except errors.Forbidden:
        cm = None
    text = ((cm or {}).get("data") or {}).get(HEALTH_KEY)
    if text:
        from fleetkeeper.core.config import load_model, parse_yaml

        data = parse_yaml(text, f"configmap {namespace}/{HEALTH_CONFIGMAP}") or {}
        raw = data.get("budget") if isinstance(data, dict) else None
        return cfg, load_model(BudgetConfig, raw or {}, f"configmap {namespace}/{HEALTH_CONFIGMAP} budget"), \
            f"configmap {namespace}/{HEALTH_CONFIGMAP} (budget section)"
    return cfg, BudgetConfig(), "built-in defaults"


@dataclass
class Fleet:
    names: Names
    cfg: LifecycleConfig
    budget: BudgetConfig
    source: str
    nodes: list[NodeView]
    pods: list[PodView]

    def pods_on(self, node: str) -> list[PodView]:
        return [p for p in self.pods if p.node == node]

    def members(self, gang: str) -> list[PodView]:
        return [p for p in self.pods if gang_of(p, self.names) == gang]

    def facts(self, n: NodeView) -> machine.Facts:
        return machine.facts_of(n, self.names, sum(1 for p in self.pods_on(n.name) if evictable(p) or p.deleting))


async def load_fleet(kube: Kube, names: Names, namespace: str = SYSTEM_NAMESPACE) -> Fleet:
    cfg, budget, src = await load_config(kube, namespace)
    proj = default_projector(names.domain)
    nodes = [proj.node(n) for n in (await kube.list(NODES))[0]]
    pods = [proj.pod(p) for p in (await kube.list(PODS))[0]]
    return Fleet(names, cfg, budget, src, nodes, pods)


def budget_report(fleet: Fleet, now: float) -> dict:
    """Per scope: nodes out of service, the limit, and which nodes; new disruptions in the window."""
    snap = bud.snapshot(fleet.nodes, fleet.names, fleet.budget)
    used, recent = bud.usage(snap, {}, fleet.budget, now)
    scopes = {}
    for s in sorted(snap.totals, key=lambda s: (s != "cluster", s)):
        if s != "cluster" and not used.get(s):
            continue
        scopes[s] = {"used": used.get(s, 0), "limit": bud.limit_of(s, fleet.budget).limit(snap.totals[s]),
                     "nodes": sorted(snap.out.get(s, ()))[:20], "total": snap.totals[s]}
    return {"source": fleet.source, "scopes": scopes, "new_in_window": recent,
            "max_new_per_window": fleet.budget.max_new_per_window, "window_s": fleet.budget.window}


def node_lines(fleet: Fleet, node: NodeView, now: float) -> list[str]:
    f = fleet.facts(node)
    snap = bud.snapshot(fleet.nodes, fleet.names, fleet.budget)
    verdict = bud.admit(node.name, snap.scopes.get(node.name, ("cluster",)), snap, {}, fleet.budget, now)
    d = machine.decide(f, fleet.cfg, fleet.names, now, budget_ok=verdict.admitted)
    lines = [f"state {d.state} since {_when(d.since)}: {d.reason}"]
    if f.state and f.state != d.state:
        lines.append(f"recorded state {f.state} (since {_when(f.since) if f.since else '?'})")
    if d.deadline is not None:
        left = d.deadline - now
        esc = machine.ESCALATION.get(d.state, "")
        lines.append(f"deadline {_when(d.deadline)} ({'passed' if left <= 0 else f'{left:.0f}s left'}): then {esc}")
    lines.append(f"next: {d.next_step}")
    lines.append(("if taken out of service now, " if d.state not in machine.OUT_OF_SERVICE else "") + verdict.explain())
    pods, gangs = gang_evictions(fleet.pods_on(node.name), fleet.members, fleet.names)
    if gangs:
        lines.append(f"a drain evicts {len(pods)} pod(s) together, gang(s) {', '.join(gangs)}: one disruption")
    for line in d.plan.describe():
        lines.append(f"would now: {line}")
    return lines


async def explain_node(kube: Kube, names: Names, node_name: str) -> list[str]:
    fleet = await load_fleet(kube, names)
    node = next((n for n in fleet.nodes if n.name == node_name), None)
    if node is None:
        return []
    return node_lines(fleet, node, time.time())


def format_budget(rep: dict) -> str:
    out = [f"disruption budget ({rep['source']}): nodes out of service / limit"]
    for s, b in rep["scopes"].items():
        lim = "none" if b["limit"] is None else b["limit"]
        full = "  FULL" if b["limit"] is not None and b["used"] >= b["limit"] else ""
        out.append(f"  {s:<24} {b['used']}/{lim} of {b['total']}{full}  {', '.join(b['nodes'][:5])}"
                   f"{' ...' if len(b['nodes']) > 5 else ''}")
    cap = rep["max_new_per_window"]
    out.append(f"  new disruptions in the last {rep['window_s']:.0f}s: {rep['new_in_window']}/"
               f"{'none' if cap is None else cap}")
    return "\n".join(out)


def dump(rep: dict) -> str:
    return yaml.safe_dump(rep, sort_keys=False)
