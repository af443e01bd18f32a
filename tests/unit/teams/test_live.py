"""The one-shot plan of the CLI and explain (``teams.live.load``) asks the disruption budget in force, as
the controller does, and reads the ConfigMap through the core loader."""

from __future__ import annotations

from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES
from fleetkeeper.teams.live import load

N = Names()
TEAMS = "teams:\n  - {team: a, nodeSelector: {fleetkeeper.io/pool: gpu}, count: 2}\n"


def raw(name, *, team="", cordoned=False, quarantined=False):
    taints = [{"key": N.team, "value": team, "effect": "NoSchedule"}] if team else []
    if quarantined:
        taints.append({"key": N.quarantine, "value": "xid", "effect": "NoSchedule"})
    labels = {N.pool: "gpu", **({N.team: team} if team else {})}
    return {"metadata": {"name": name, "uid": name, "resourceVersion": "1", "labels": labels},
            "spec": {"taints": taints, "unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


class FakeKube:
    def __init__(self, nodes, cms):
        self.nodes, self.cms = nodes, cms

    async def get_or_none(self, res, name, namespace=None):
        return self.cms.get(name)

    async def list(self, res, namespace=None, **kw):
        return (self.nodes if res == NODES else []), "1"


def cm(key, text):
    return {"metadata": {"name": "x", "namespace": "fk", "resourceVersion": "1"}, "data": {key: text}}


async def test_the_cli_plan_holds_a_replacement_the_budget_has_no_room_for():
    nodes = [raw("t0", team="a", cordoned=True), raw("t1", team="a"), raw("q0", quarantined=True),
             raw("s0"), raw("s1")]
    budget = "budget: {cluster: {max_nodes: 1}, zone: {max_percent: 100}, rack: {max_nodes: 9}}\n"
    live = await load(FakeKube(nodes, {"fleetkeeper-teams": cm("config.yaml", TEAMS),
                                       "fleetkeeper-lifecycle": cm("lifecycle.yaml", budget)}), N, "fk")
    assert live.plan.budget_held == ["t0"] and live.plan.changes == []
    assert live.budget_source == "configmap fk/fleetkeeper-lifecycle"
    # with room (the quarantine lifted), the same call plans the replacement
    nodes[2] = raw("q0")
    live = await load(FakeKube(nodes, {"fleetkeeper-teams": cm("config.yaml", TEAMS),
                                       "fleetkeeper-lifecycle": cm("lifecycle.yaml", budget)}), N, "fk")
    acts = {c.node: c.action for c in live.plan.changes}
    assert live.plan.budget_held == [] and acts["t0"] == "release" and list(acts.values()).count("replace") == 1


async def test_the_cli_reads_the_configmap_through_the_core_loader():
    live = await load(FakeKube([], {}), N, "fk")
    assert live.config is None and "ConfigMap not found" in live.config_error
    live = await load(FakeKube([], {"fleetkeeper-teams": cm("other.yaml", TEAMS)}), N, "fk")
    assert live.config is None and "missing key 'config.yaml'" in live.config_error


async def test_explain_says_a_replacement_is_held_by_the_budget():
    from fleetkeeper.teams.plan import explain_node

    nodes = [raw("t0", team="a", cordoned=True), raw("t1", team="a"), raw("q0", quarantined=True), raw("s0")]
    budget = "budget: {cluster: {max_nodes: 1}, zone: {max_percent: 100}, rack: {max_nodes: 9}}\n"
    live = await load(FakeKube(nodes, {"fleetkeeper-teams": cm("config.yaml", TEAMS),
                                       "fleetkeeper-lifecycle": cm("lifecycle.yaml", budget)}), N, "fk")
    t0 = next(s for s in live.states if s.name == "t0")
    assert any("held: the disruption budget" in line for line in explain_node(live.plan, live.config, t0, live.states))
