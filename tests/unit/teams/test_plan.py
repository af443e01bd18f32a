"""decide(): stable, minimal, deterministic team assignment."""

from __future__ import annotations

import pytest

from fleetkeeper.core.views import Taint
from fleetkeeper.teams.plan import decide, explain_node

from teams_helpers import N, cfg, state, teams_of

GPU = {"example.com/pool": "gpu"}


def names(n: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


def test_from_scratch_assigns_exact_counts_and_nothing_else():
    nodes = [state(n) for n in names(10)]
    p = decide(nodes, cfg([("a", GPU, 3), ("b", GPU, 4)]))
    t = teams_of(p, nodes)
    assert len(t["a"]) == 3 and len(t["b"]) == 4 and len(t[""]) == 3
    assert len(p.changes) == 7 and all(c.action == "assign" for c in p.changes)
    assert p.teams["a"].shortfall == 0 and p.teams["b"].assigned == 4


def test_steady_state_has_zero_changes():
    nodes = [state(n) for n in names(10)]
    c = cfg([("a", GPU, 3), ("b", GPU, 4)])
    p = decide(nodes, c)
    after = [state(n.name, team=p.target.get(n.name, "")) for n in nodes]
    assert decide(after, c).changes == []


@pytest.mark.parametrize("old,new,moved", [
    (3, 5, 2),  # grow: only the 2 new nodes are written
    (5, 3, 2),  # shrink: only 2 released
    (4, 4, 0),
])
def test_count_change_moves_only_what_must_move(old, new, moved):
    nodes = [state(n, team="a" if i < old else "") for i, n in enumerate(names(10))]
    p = decide(nodes, cfg([("a", GPU, new)]))
    assert len(p.changes) == moved
    kept = {n.name for n in nodes if n.team == "a"} & {k for k, v in p.target.items() if v == "a"}
    assert len(kept) == min(old, new)


def test_shrink_releases_idle_nodes_before_busy_ones():
    nodes = [state("n0", team="a", pod_teams=frozenset({"a"})), state("n1", team="a"),
             state("n2", team="a", pod_teams=frozenset({"a"}))]
    p = decide(nodes, cfg([("a", GPU, 2)]))
    assert [c.node for c in p.changes] == ["n1"]
    assert p.changes[0].action == "release"


def test_nodes_running_other_teams_pods_are_taken_last():
    nodes = [state("n0", pod_teams=frozenset({"b"})), state("n1"), state("n2", pod_teams=frozenset({"a"}))]
    p = decide(nodes, cfg([("a", GPU, 2)]))
    assert sorted(k for k, v in p.target.items() if v == "a") == ["n1", "n2"]


def test_one_team_shrinking_while_another_grows_moves_nodes_in_one_write_each():
    nodes = [state(n, team="a" if i < 6 else "") for i, n in enumerate(names(8))]
    p = decide(nodes, cfg([("a", GPU, 2), ("b", GPU, 4)]))
    assert len(p.changes) == 4  # 4 moves a->b, not 4 releases + 4 assigns
    assert all(c.action == "move" for c in p.changes)
    assert sum(1 for v in p.target.values() if v == "a") == 2


def test_shortfall_is_reported_with_reason():
    nodes = [state(n) for n in names(5)]
    p = decide(nodes, cfg([("a", GPU, 8)]))
    st = p.teams["a"]
    assert (st.desired, st.assigned, st.eligible, st.shortfall) == (8, 5, 5, 3)
    assert "3 node(s) short" in st.reasons[0]


@pytest.mark.parametrize("kw,why", [
    ({"cordoned": True}, "cordoned"),
    ({"ready": False}, "not Ready"),
    ({"taints": (Taint(N.quarantine, "xid-79", "NoSchedule"),)}, "quarantined (xid-79)"),
    ({"taints": (Taint(N.preflight, "pending", "NoSchedule"),)}, "in preflight"),
    ({"labels": {N.preflight: "pending"}}, "in preflight"),
])
def test_ineligible_nodes_do_not_count_and_are_replaced(kw, why):
    nodes = [state("n0", team="a", **kw), state("n1", team="a"), state("n2")]
    p = decide(nodes, cfg([("a", GPU, 2)]))
    assert not nodes[0].eligible and nodes[0].why_ineligible.startswith(why)
    assert p.target == {"n1": "a", "n2": "a"}
    acts = {c.node: c.action for c in p.changes}
    assert acts == {"n2": "replace", "n0": "release"}
    assert p.replacements == 1


def test_replacements_are_bounded_and_unhealthy_nodes_held_until_replaced():
    nodes = [state(f"s{i}", team="a", cordoned=True) for i in range(4)] + [state(n) for n in names(6)]
    c = cfg([("a", GPU, 4)])
    p = decide(nodes, c, replacement_budget=1)
    assert p.replacements == 1 and p.throttled == 3
    assert p.teams["a"].assigned == 1 and p.teams["a"].held_unhealthy == 3
    assert "replacement rate limit" in " ".join(p.teams["a"].reasons)
    # held nodes keep their team: no write for them
    assert {c.node for c in p.changes} == {"s0", "n00"}


def test_recovered_unhealthy_node_is_simply_kept():
    nodes = [state("n0", team="a"), state("n1")]
    assert decide(nodes, cfg([("a", GPU, 1)]), replacement_budget=0).changes == []


def test_fresh_capacity_is_not_limited_by_replacement_budget():
    nodes = [state(n) for n in names(5)]
    p = decide(nodes, cfg([("a", GPU, 5)]), replacement_budget=0)
    assert p.teams["a"].assigned == 5


def test_overlapping_selectors_more_specific_first_then_configmap_order():
    nodes = [state(n, labels={"topology.kubernetes.io/zone": "z1" if i < 3 else "z2"}) for i, n in enumerate(names(6))]
    c = cfg([("a", GPU, 4), ("b", {**GPU, "topology.kubernetes.io/zone": "z1"}, 3)])
    p = decide(nodes, c)
    assert p.order == [1, 0]
    assert sorted(k for k, v in p.target.items() if v == "b") == ["n00", "n01", "n02"]
    assert p.teams["a"].assigned == 3 and p.teams["a"].shortfall == 1
    assert any("more specific selector" in line for line in p.overlaps)
    same = cfg([("a", GPU, 2), ("b", GPU, 2)])
    assert "earlier in the ConfigMap" in decide(nodes, same).overlaps[0]


def test_existing_assignment_survives_overlap_order():
    # b is served first, but a already holds n0 and n1: they stay a's
    nodes = [state("n0", team="a"), state("n1", team="a"), state("n2"), state("n3")]
    c = cfg([("a", GPU, 2), ("b", {**GPU, "example.com/rack": "r1"}, 2)])
    nodes = [state(n.name, team=n.team, labels={"example.com/rack": "r1"}) for n in nodes]
    p = decide(nodes, c)
    assert p.target["n0"] == "a" and p.target["n1"] == "a"
    assert sorted(k for k, v in p.target.items() if v == "b") == ["n2", "n3"]


def test_deterministic_regardless_of_input_order():
    nodes = [state(n) for n in names(20)]
    c = cfg([("a", GPU, 5), ("b", GPU, 7)])
    assert decide(nodes, c).target == decide(list(reversed(nodes)), c).target


def test_inconsistent_label_and_taint_are_repaired():
    nodes = [state("n0", team="a", label_team="b"), state("n1", team="", label_team="a")]
    p = decide(nodes, cfg([("a", GPU, 1)]))
    acts = sorted((c.node, c.action) for c in p.changes)
    # n0's taint says a: it is kept and repaired; n1 only has a stray label: released
    assert acts == [("n0", "repair"), ("n1", "release")]


def test_team_removed_from_config_releases_its_nodes():
    nodes = [state("n0", team="gone"), state("n1")]
    p = decide(nodes, cfg([("a", GPU, 1)]))
    assert p.target.get("n0") != "gone"  # reused by a (one write), or released
    p = decide(nodes, cfg([("a", GPU, 0)]))
    rel = [c for c in p.changes if c.node == "n0"][0]
    assert rel.action == "release" and "no entry" in rel.reason


def test_explain_node_lines():
    nodes = [state("n0"), state("n1", cordoned=True)]
    c = cfg([("a", GPU, 1), ("b", GPU, 1)])
    p = decide(nodes, c)
    lines = explain_node(p, c, nodes[0], nodes)
    assert any("selected by teams[0]" in line for line in lines)
    assert any("overlapping selectors" in line for line in lines)
    assert any("not eligible" in line for line in explain_node(p, c, nodes[1], nodes))


def test_scale_7500_nodes_40_teams_is_exact():
    nodes = [state(f"n{i:05d}", labels={"topology.kubernetes.io/zone": f"z{i % 3}"}) for i in range(7500)]
    entries = [(f"t{k:02d}", {"topology.kubernetes.io/zone": f"z{k % 3}"}, 60) for k in range(40)]
    p = decide(nodes, cfg(entries))
    assert all(st.assigned == 60 for st in p.teams.values())
    assert len(p.changes) == 2400 and len(set(c.node for c in p.changes)) == 2400


# --- the one disruption budget: replacements ask it (table, pure) -------------------------------
from fleetkeeper.lifecycle import budget as bud  # noqa: E402
from fleetkeeper.lifecycle.config import BudgetConfig, Limit  # noqa: E402
from fleetkeeper.teams.plan import node_state as _node_state  # noqa: E402
from teams_helpers import view  # noqa: E402

BUDGET2 = BudgetConfig(cluster=Limit(max_nodes=2), zone=Limit(max_percent=100), rack=Limit(max_nodes=10),
                       max_new_per_window=None)
QUAR = (Taint(N.quarantine, "xid-79", "NoSchedule"),)


def _views(team_kw: dict[str, dict], spares: int, quarantined_spares: int):
    vs = [view(name, team="a", **kw) for name, kw in team_kw.items()]
    vs += [view(f"n{i:02d}", taints=QUAR if i < quarantined_spares else ()) for i in range(spares)]
    return vs


@pytest.mark.parametrize("team_kw,quarantined,inflight,replaced,held", [
    # the budget is spent by two health quarantines: a cordoned team node is not replaced
    ({"t0": {"cordoned": True}, "t1": {}}, 2, (), [], ["t0"]),
    # a quarantined team node holds its own unit: replacing it is part of that disruption
    ({"t0": {"taints": QUAR}, "t1": {}}, 2, (), ["t0"], []),
    # room for one: the first replacement takes it, the second waits
    ({"t0": {"cordoned": True}, "t1": {"ready": False}, "t2": {}}, 1, (), ["t0"], ["t1"]),
    # an admission in flight elsewhere (health's, not yet in the cache) counts
    ({"t0": {"cordoned": True}, "t1": {}}, 1, ("n05",), [], ["t0"]),
    # nothing spent: every replacement admitted
    ({"t0": {"cordoned": True}, "t1": {"cordoned": True}, "t2": {}}, 0, (), ["t0", "t1"], []),
])
def test_replacements_ask_the_shared_disruption_budget(team_kw, quarantined, inflight, replaced, held):
    views = _views(team_kw, spares=8, quarantined_spares=quarantined)
    states = [_node_state(v, N) for v in views]
    snap = bud.snapshot(views, N, BUDGET2)
    ledger = {n: bud.InFlight(n, "quarantine", 100.0, ("cluster",)) for n in inflight}
    admit = bud.Admitter(snap, ledger, BUDGET2, 100.0, "team-replace")
    p = decide(states, cfg([("a", GPU, len(team_kw))]), 10, lambda n: admit(n).admitted)
    assert sorted(c.node for c in p.changes if c.action == "release") == replaced
    assert p.replacements == len(replaced) and p.budget_held == held
    # a new disruption is in flight for each admitted replacement of a node that held no unit
    assert sorted(admit.added) == [n for n in replaced if not team_kw[n].get("taints")]
    if held:
        assert "disruption budget used up" in " ".join(p.teams["a"].reasons)
        assert "used up in cluster" in admit.verdicts[held[0]].explain()


# --- a Conflict sent again without planning again: only when the newer node gives decide() the same inputs
import dataclasses  # noqa: E402

from fleetkeeper.core.views import Condition  # noqa: E402
from fleetkeeper.teams.plan import replaced_at_key, same_inputs  # noqa: E402


@pytest.mark.parametrize("change, same", [
    (dict(), True),  # a status heartbeat: only the resourceVersion moved
    (dict(conditions=(Condition("Ready", "True", "KubeletReady", "posting ready status", 5.0),)), True),
    (dict(taints=(Taint(N.team, "a", "NoSchedule"), Taint("example.com/other", "x", "NoSchedule"))), True),
    (dict(unschedulable=True), False),
    (dict(conditions=(Condition("Ready", "False", "", "", 0.0),)), False),
    (dict(taints=(Taint(N.team, "a", "NoSchedule"), Taint(N.quarantine, "ecc", "NoSchedule"))), False),
    (dict(taints=()), False),  # the team taint gone
    (dict(labels={"example.com/pool": "cpu", N.team: "a"}), False),
    (dict(annotations={replaced_at_key(N): "1800000000"}), False),
    (dict(deleting=True), False),
])
def test_same_inputs_only_for_changes_the_plan_does_not_read(change, same):
    planned = view("n1", team="a", rv="5")
    assert same_inputs(planned, dataclasses.replace(planned, resource_version="6", **change), N) is same
