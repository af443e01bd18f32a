from __future__ import annotations

from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import Condition, NodeView, Taint
from fleetkeeper.teams.config import TeamsConfig
from fleetkeeper.teams.plan import NodeState, node_state

N = Names("example.com")


def view(name: str, *, team: str = "", labels: dict | None = None, taints: tuple = (), ready: bool = True,
         cordoned: bool = False, rv: str = "1", label_team: str | None = None) -> NodeView:
    lab = {"example.com/pool": "gpu", **(labels or {})}
    ts = list(taints)
    if team:
        ts.append(Taint(N.team, team, "NoSchedule"))
    lt = team if label_team is None else label_team
    if lt:
        lab[N.team] = lt
    return NodeView(name=name, uid=f"uid-{name}", resource_version=rv, labels=lab, annotations={}, taints=tuple(ts),
                    unschedulable=cordoned,
                    conditions=(Condition("Ready", "True" if ready else "False", "", "", 0.0),),
                    gpus=8, cpu_millis=96000, created=0.0, deleting=False)


def state(name: str, *, pod_teams: frozenset = frozenset(), **kw) -> NodeState:
    return node_state(view(name, **kw), N, pod_teams)


def cfg(entries: list[tuple[str, dict, int]], **kw) -> TeamsConfig:
    return TeamsConfig.model_validate({"teams": [{"team": t, "nodeSelector": s, "count": c} for t, s, c in entries],
                                       **kw})


def teams_of(plan, nodes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in nodes:
        t = plan.target.get(n.name, "")
        out.setdefault(t, []).append(n.name)
    return out
