"""Teams and health in one manager on the real local control plane: a team replacement asks the one
disruption budget, and is held while health's quarantines have spent it."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from fleetkeeper.core.events import flush_all
from fleetkeeper.core.faults import FaultPlan, parse_fault
from fleetkeeper.core.kube import CONFIGMAPS, EVENTS, NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.controller import HealthOptions
from fleetkeeper.health.controller import setup as health_setup
from fleetkeeper.health.policy import load_policy
from fleetkeeper.lifecycle.config import BudgetConfig, Limit
from fleetkeeper.lifecycle.controller import shared_budget
from fleetkeeper.teams.controller import setup as teams_setup

from teams_e2e_helpers import NAMES, until
from test_teams_e2e import config, converged

Q = NAMES.quarantine


async def test_a_team_replacement_waits_while_health_quarantines_spend_the_budget(env, tmp_path):
    nodes = await env.create_nodes(6)
    await env.write_config(config(env, [("team-a", 2)]))
    # the budget: at most 2 of this test's nodes out of service (a label scope, so other tests' nodes on the
    # shared control plane do not count)
    policy = load_policy(f"""
budget: {{cluster: {{max_percent: 100}}, zone: {{max_percent: 100}}, rack: {{max_percent: 100}},
         labels: {{{env.select_key}: {{max_nodes: 2}}}}, max_new_per_window: 100}}
drain: {{deadline: 1h, retry_interval: 1s}}
storm: {{min_nodes: 50}}
node_selector: {{{env.select_key}: '{env.id}'}}
""", "test")
    registry = CollectorRegistry()
    mgr = Manager(env.kube, RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}),
                  registry=registry)
    faults = FaultPlan(tmp_path / "faults.json")
    await health_setup(mgr, HealthOptions(policy=policy, simulate=True, fault_file=str(faults.path),
                                          sim_interval=0.5, sim_heartbeat=60.0))
    await teams_setup(mgr, {"configNamespace": env.namespace, "resyncSeconds": 2, "webhook": {"enabled": False}})
    env.mgr, env.task = mgr, asyncio.create_task(mgr.run())
    await converged(env, {"team-a": 2})
    owned = sorted(n for n, (label, _) in (await env.node_teams()).items() if label == "team-a")
    spares = [n for n in nodes if n not in owned]

    # health quarantines two spare nodes: the budget (2) is spent
    for n in spares[:2]:
        faults.inject(n, parse_fault("ecc"))

    async def quarantined():
        out = [n for n in spares[:2] if any(t["key"] == Q for t in (await env.kube.get(NODES, n))["spec"].get("taints") or [])]
        return out if len(out) == 2 else None
    await until(quarantined, 60, "two spares quarantined by health")

    # a team node is cordoned: it must be replaced, but that would take a third node out of the shared pool
    sick = owned[0]
    await env.kube.patch(NODES, sick, {"spec": {"unschedulable": True}})

    async def held():
        cm = await env.kube.get_or_none(CONFIGMAPS, "fleetkeeper-teams-status", env.namespace)
        st = (cm or {}).get("data", {}).get("status.json", "")
        return st if f'"{sick}"' in st and "heldByDisruptionBudget" in st else None
    await until(held, 60, "the replacement held by the disruption budget")
    await flush_all(60)  # Events are written by the recorders' sinks, after the action
    evs, _ = await env.kube.list(EVENTS, env.namespace)
    notes = [e["note"] for e in evs if e.get("reason") == "TeamReplacementHeld"]
    assert notes and sick in notes[-1] and f"label:{env.select_key}={env.id} 2/2" in notes[-1], notes
    # held, and for as long as the budget stays spent: the cordoned node keeps its team, no spare is taken
    await asyncio.sleep(3)  # several teams passes (resync 2 s); the verdict must not change
    teams_now = await env.node_teams()
    assert sorted(n for n, (label, _) in teams_now.items() if label == "team-a") == owned
    assert registry.get_sample_value("fleetkeeper_node_writes_total",
                                     {"component": "teams", "action": "replace", "result": "success"}) is None

    # the operator raises the budget: the replacement is made, through the applier
    shared_budget(mgr).configure(BudgetConfig(cluster=Limit(max_percent=100), zone=Limit(max_percent=100),
                                              rack=Limit(max_percent=100), labels={env.select_key: Limit(max_nodes=3)}))

    async def replaced():
        t = await env.node_teams()
        a = sorted(n for n, (label, _) in t.items() if label == "team-a")
        return a if sick not in a and len(a) == 2 else None
    now_owned = await until(replaced, 60, "the cordoned team node replaced")
    new = next(n for n in now_owned if n not in owned)
    assert new not in spares[:2]  # never a quarantined node
    node = await env.kube.get(NODES, new)
    assert f"{NAMES.domain}/team-replaced-at" in node["metadata"]["annotations"]
    assert registry.get_sample_value("fleetkeeper_node_writes_total",
                                     {"component": "teams", "action": "replace", "result": "success"}) == 1
    # the replacement holds no unit once written (dropped right after the pass's writes, which the API
    # shows first): only health's two quarantines stay in the ledger's place
    async def unit_released():
        return all(f.kind != "team-replace" for f in shared_budget(mgr).ledger.view().values())
    await until(unit_released, 30, "the replacement's budget unit released")
