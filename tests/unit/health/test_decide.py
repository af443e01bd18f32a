"""The pure remediation decisions, table by table, and the agent's write logic on a FakeClock."""

from __future__ import annotations

import asyncio

import pytest

from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.errors import ConfigError
from fleetkeeper.core.faults import parse_fault
from fleetkeeper.core.views import Condition, NodeView, PodView, Taint
from fleetkeeper.health.agent import AgentCore, simulated_findings
from fleetkeeper.health.conditions import Finding
from fleetkeeper.health.actionproto import Report, Request, new_request
from fleetkeeper.health.decide import Keys, classify, decide_node, fleet_stats, history_add
from fleetkeeper.health.policy import Policy, load_policy

N = Names()
K = Keys(N)
NOW = 1_800_000_000.0


def node(conds=(), taints=(), ann=None, name="n1", zone="zone-a", rack="rack-0001") -> NodeView:
    return NodeView(name, "uid", "1", {"topology.kubernetes.io/zone": zone, N.rack: rack}, dict(ann or {}),
                    tuple(Taint(k, v, "NoSchedule") for k, v in taints), False,
                    tuple(Condition(t, s, r, "", since) for t, s, r, since in conds), 8, 0, 0.0, False)


def pod(name, owner="Job", phase="Running", deleting=False) -> PodView:
    return PodView("ns", name, "u", "1", "n1", phase, 0, "", {}, {}, owner, "o", (), 0, deleting, 0.0, "", "", "",
                   "", "")


P = Policy()


@pytest.mark.parametrize("ctype,reason,remedy,action", [
    ("GPUXidError", "Xid79", "reboot", "drain"),
    ("GPUXidError", "Xid48,Xid64", "replace", "terminate"),  # the worst code wins
    ("GPUXidError", "Xid13", "none", None),  # application error: no problem
    ("GPUXidError", "Xid999", "investigate", "quarantine"),  # unknown code
    ("GPUUnhealthy", "UncorrectableECC", "reset", "drain"),
    ("GPUUnhealthy", "GPUMissing", "replace", "terminate"),
    ("DiskUnhealthy", "IOErrors", "replace", "terminate"),
    ("MaintenanceScheduled", "AzureReboot", "wait", "drain"),
    ("MaintenanceScheduled", "GCEMigrate", "wait", "event"),
    ("KernelDeadlock", "DockerHung", "reboot", "drain"),  # node-problem-detector's condition
])
def test_classification_table(ctype, reason, remedy, action):
    h = classify(node([(ctype, "True", reason, NOW - 1)]), P, NOW)
    if action is None:
        assert h.worst is None
    else:
        assert (h.worst.remedy, h.worst.action) == (remedy, action)


def test_new_fault_quarantines_and_pending_waits_for_trigger():
    p = decide_node(node([("GPUUnhealthy", "True", "UncorrectableECC", NOW - 1)]), [], P, N, NOW)
    assert (p.kind, p.action, p.remedy) == ("quarantine", "drain", "reset")
    p = decide_node(node([("NetworkUnreachable", "True", "TargetsUnreachable", NOW - 10)]), [], P, N, NOW)
    assert p.kind == "wait" and p.wait == "trigger" and 49 < p.requeue_after <= 50


def q_ann(action="drain", remedy="reset", types="GPUUnhealthy", since=NOW - 100, **extra):
    return {K.action: action, K.remedy: remedy, K.types: types, K.since: str(int(since)), **extra}


QT = [(N.quarantine, "x")]


def test_ladder_evicts_then_drains_then_terminates():
    c = [("GPUUnhealthy", "True", "GPUMissing", NOW - 100)]
    pods = [pod("a"), pod("ds", owner="DaemonSet"), pod("done", phase="Succeeded")]
    p = decide_node(node(c, QT, q_ann("terminate", "replace")), pods, P, N, NOW)
    assert p.kind == "evict" and p.pods == ("ns/a",)
    p = decide_node(node(c, QT, q_ann("terminate", "replace")), [pod("a", deleting=True)], P, N, NOW)
    assert p.kind == "wait" and p.wait == "pdb"
    p = decide_node(node(c, QT, q_ann("terminate", "replace")), [], P, N, NOW)
    assert p.kind == "terminate" and not p.deadline_passed
    # drain ladder: drained, then wait for the repair
    c2 = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 100)]
    # drained (no write): the node's agent is asked for the reset, then the controller waits for it
    assert decide_node(node(c2, QT, q_ann()), [], P, N, NOW).kind == "request_action"
    req = new_request("reset", "n1", "uid", NOW, 600)
    p = decide_node(node(c2, QT, q_ann(**{K.request: req.dumps()})), [], P, N, NOW)
    assert p.kind == "wait" and p.wait == "action"
    assert decide_node(node(c2, QT, q_ann()), [], Policy(actions={"enabled": False}), N, NOW).wait == "drained"


def test_a_node_with_nothing_to_drain_is_quarantined_and_asked_for_its_repair_in_one_write():
    ecc = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 1)]
    p = decide_node(node(ecc), [], P, N, NOW)
    assert (p.kind, p.action, p.remedy) == ("quarantine", "drain", "reset")
    assert p.request == "nothing to drain; asking the node's agent for a reset"
    # pods left alone by a drain (DaemonSet, static, finished) are nothing to drain
    idle = [pod("ds", owner="DaemonSet"), pod("static", owner="Node"), pod("done", phase="Succeeded")]
    assert decide_node(node(ecc), idle, P, N, NOW).request
    xid79 = decide_node(node([("GPUXidError", "True", "Xid79", NOW - 1)]), [], P, N, NOW)
    assert (xid79.kind, xid79.request) == ("quarantine", "nothing to drain; asking the node's agent for a reboot")
    # also when the fault comes back during validation
    val = node(ecc, [(N.preflight, "pending")], {K.state: "validating"})
    assert decide_node(val, [], P, N, NOW).request


def test_a_node_with_pods_or_no_node_local_remedy_keeps_the_quarantine_drain_request_path():
    ecc = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 1)]
    for pods in ([pod("a")], [pod("a", deleting=True)]):  # to evict (PDBs honoured), or still terminating
        p = decide_node(node(ecc), pods, P, N, NOW)
        assert (p.kind, p.request) == ("quarantine", "")
    assert decide_node(node(ecc), [], Policy(actions={"enabled": False}), N, NOW).request == ""
    for cond in (("GPUUnhealthy", "True", "GPUMissing", NOW - 1),  # replace: terminate, nothing node-local
                 ("GPUXidError", "True", "Xid999", NOW - 1)):  # investigate: quarantine only
        p = decide_node(node([cond]), [], P, N, NOW)
        assert p.kind == "quarantine" and p.request == "", cond
    assert decide_node(node(ecc), [], P, N, NOW, window_waiting=("n7",)).request == ""
    # a request of this very Node already there (its taint removed by hand, the fault still on): no new one
    old = new_request("reset", "n1", "uid", NOW - 10, 600)
    p = decide_node(node(ecc, (), {K.request: old.dumps()}), [], P, N, NOW)
    assert (p.kind, p.request) == ("quarantine", "")
    # one left by another Node of the same name is no request: asked again
    other = new_request("reset", "n1", "other-uid", NOW - 10, 600)
    assert decide_node(node(ecc, (), {K.request: other.dumps()}), [], P, N, NOW).request


def test_after_the_folded_write_a_restarted_controller_waits_for_the_agent():
    """What the one write leaves on the node (taint, markers, request) is all a restarted controller
    reads: it waits for the agent's report, never asks again, never requests a drain."""
    ecc = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 5)]
    req = new_request("reset", "n1", "uid", NOW - 4, 600)
    written = node(ecc, QT, q_ann(since=NOW - 4, **{K.request: req.dumps()}))
    p = decide_node(written, [], P, N, NOW)
    assert (p.kind, p.wait) == ("wait", "action")
    done = {**written.annotations, K.result: Report(req.nonce, "failed", "nvidia-smi exited 1", NOW).dumps()}
    assert decide_node(node(ecc, QT, done), [], P, N, NOW).kind == "escalate"


def test_deadline_terminates_even_when_a_pdb_blocks():
    c = [("GPUUnhealthy", "True", "GPUMissing", NOW - 8 * 86400)]
    p = decide_node(node(c, QT, q_ann("terminate", "replace", since=NOW - 7 * 86400 - 1)), [pod("a")], P, N, NOW)
    assert p.kind == "terminate" and p.deadline_passed and "7d" in p.why
    p = decide_node(node(c, QT, q_ann("terminate", "replace", since=NOW - 6 * 86400)), [pod("a")], P, N, NOW)
    assert p.kind == "evict"


def test_escalation_when_a_worse_problem_appears():
    c = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 100), ("GPUUnhealthy", "True", "GPUMissing", NOW)]
    c = [("GPUXidError", "True", "Xid64", NOW - 5)]
    p = decide_node(node(c, QT, q_ann()), [], P, N, NOW)
    assert (p.kind, p.action, p.remedy) == ("escalate", "terminate", "replace")


def test_node_local_action_fenced_reported_and_escalated():
    c = [("GPUXidError", "True", "Xid79", NOW - 100)]
    drained = q_ann("drain", "reboot", types="GPUXidError")
    assert decide_node(node(c, QT, drained), [], P, N, NOW).kind == "request_action"
    req = new_request("reboot", "n1", "uid", NOW - 10, 600)
    # a request for another Node of the same name (another uid) is no request
    other = Request(req.action, req.nonce, "n1", "other-uid", req.at, req.deadline)
    assert decide_node(node(c, QT, {**drained, K.request: other.dumps()}), [], P, N, NOW).kind == "request_action"
    asked = {**drained, K.request: req.dumps()}
    assert decide_node(node(c, QT, asked), [], P, N, NOW).wait == "action"
    # failed -> replace at once; no report by the deadline -> replace; done but still faulty at the deadline -> replace
    failed = {**asked, K.result: Report(req.nonce, "failed", "nvidia-smi exited 1", NOW).dumps()}
    p = decide_node(node(c, QT, failed), [], P, N, NOW)
    assert (p.kind, p.action, p.remedy) == ("escalate", "terminate", "replace") and "failed" in p.why
    p = decide_node(node(c, QT, asked), [], P, N, req.deadline)
    assert p.kind == "escalate" and "never reported" in p.why
    ok = {**asked, K.result: Report(req.nonce, "succeeded", "rebooted", NOW).dumps()}
    assert decide_node(node(c, QT, ok), [], P, N, NOW).wait == "action"
    p = decide_node(node(c, QT, ok), [], P, N, req.deadline + 1)
    assert p.kind == "escalate" and "did not clear" in p.why
    # a report for an older nonce does not count
    stale = {**asked, K.result: Report("old", "succeeded", "x", NOW).dumps()}
    assert decide_node(node(c, QT, stale), [], P, N, NOW).wait == "action"
    # cleared after the action: back through the preflight gate, markers (request, result) removed by the apply
    cleared = [("GPUXidError", "False", "NoXid", NOW - 400)]
    assert decide_node(node(cleared, QT, ok), [], P, N, NOW).kind == "return"
    assert K.request in K.all_state() and K.result in K.all_state()


def test_cleared_needs_clear_after_then_preflight_or_hold():
    cleared_long = [("GPUUnhealthy", "False", "GPUsHealthy", NOW - 61)]
    cleared_short = [("GPUUnhealthy", "False", "GPUsHealthy", NOW - 10)]
    assert decide_node(node(cleared_short, QT, q_ann(**{K.drained: "1"})), [], P, N, NOW).kind == "wait"
    assert decide_node(node(cleared_long, QT, q_ann(**{K.drained: "1"})), [], P, N, NOW).kind == "return"
    hold = load_policy("return_to_service: {mode: hold, hold: 10m}")
    assert decide_node(node(cleared_long, QT, q_ann()), [], hold, N, NOW).kind == "mark_cleared"
    w = decide_node(node(cleared_long, QT, q_ann(**{K.cleared: str(int(NOW - 60))})), [], hold, N, NOW)
    assert w.kind == "wait" and w.wait == "hold" and w.requeue_after == 540
    assert decide_node(node(cleared_long, QT, q_ann(**{K.cleared: str(int(NOW - 601))})), [], hold, N,
                       NOW).kind == "release"
    back = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 1)]
    assert decide_node(node(back, QT, q_ann(**{K.cleared: str(int(NOW - 60))})), [], hold, N,
                       NOW).kind == "unmark_cleared"


def test_missing_condition_is_unknown_not_healthy():
    # the condition list was rewritten without our types: stay quarantined
    p = decide_node(node([("Ready", "True", "KubeletReady", 0)], QT, q_ann()), [], P, N, NOW)
    assert p.kind == "wait"
    p = decide_node(node([("Ready", "True", "KubeletReady", 0)], QT, q_ann(**{K.drained: "1"})), [], P, N, NOW)
    assert p.kind == "wait" and "missing" in p.why


def test_flapping_quarantines_once_and_holds():
    p = decide_node(node([("NetworkUnreachable", "False", "NetworkReachable", NOW - 1)]), [], P, N, NOW,
                    flapping=True)
    assert p.kind == "quarantine" and p.problems[0].type == "Flapping"
    ann = q_ann("quarantine", "investigate", types="Flapping")
    assert decide_node(node([("NetworkUnreachable", "False", "x", NOW - 1)], QT, ann), [], P, N, NOW,
                       flapping=True).kind == "wait"
    assert decide_node(node([("NetworkUnreachable", "False", "x", NOW - 1)], QT, ann), [], P, N, NOW,
                       flapping=False).kind == "return"


def test_validation_handover_and_release():
    val = {K.state: "validating"}
    assert decide_node(node([], [(N.preflight, "pending")], val), [], P, N, NOW).wait == "validation"
    assert decide_node(node([], [], val), [], P, N, NOW).kind == "release"
    bad = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 1)]
    assert decide_node(node(bad, [(N.preflight, "pending")], val), [], P, N, NOW).kind == "quarantine"


def test_budget_limits_floor_at_min_nodes():
    # admission itself is the lifecycle's (tests/unit/test_lifecycle.py)
    assert load_policy("budget: {zone: {max_percent: 1}}").budget.zone.limit(10) == 1


def test_fleet_stats_counts_states_and_wanting():
    nodes = [node([("GPUUnhealthy", "True", "UncorrectableECC", NOW - 5)], name="bad", rack="r1"),
             node([], QT, q_ann("terminate"), name="q", rack="r1"),
             node([], [(N.preflight, "pending")], name="pf", rack="r2"),
             node([], name="ok", rack="r2")]
    st = fleet_stats(nodes, {"q": 2}, P, N, NOW, [NOW - 10, NOW - 7200])
    assert st.states == {"ready": 2, "draining": 1, "preflight": 1}
    assert st.disrupted == {"cluster": 1, "zone:zone-a": 1, "rack:r1": 1}
    assert st.wanting["cluster"] == 1 and st.onsets == 2 and st.new_in_window == 1


def test_window_count_survives_a_restart():
    # a restarted controller has no admissions in memory: the quarantined nodes' since annotations count
    nodes = [node([], QT, q_ann(since=NOW - 100), name=f"q{i}", rack=f"r{i}") for i in range(3)]
    nodes.append(node([], QT, q_ann(since=NOW - 2 * P.budget.window), name="old", rack="r9"))
    st = fleet_stats(nodes, {}, P, N, NOW, [])
    assert st.new_in_window == 3
    assert fleet_stats(nodes, {}, P, N, NOW, [NOW - 1] * 5).new_in_window == 5  # not yet in the cache


def test_policy_errors_name_the_field():
    with pytest.raises(ConfigError) as e:
        load_policy("rules: [{type: X, remedy: explode}]\nbudget: {rack: {max_nodes: -1}}\nbogus: 1")
    msg = str(e.value)
    assert "rules[0].remedy" in msg and "budget.rack.max_nodes" in msg and "bogus" in msg
    with pytest.raises(ConfigError):
        load_policy("budget: [unclosed")


def test_history_is_bounded():
    raw = None
    for i in range(15):
        raw = history_add(raw, NOW + i, f"e{i}")
    assert raw.count("e") == 10 and "e14" in raw and "e4" not in raw


# --- agent write logic ------------------------------------------------------------
class Writer:
    def __init__(self):
        self.patches = []

    async def write(self, node, patch):
        self.patches.append((node, patch))


async def test_agent_writes_on_change_and_jittered_heartbeat_only():
    clock = FakeClock(NOW)
    w = Writer()
    core = AgentCore(w, clock, heartbeat=300, jitter=0.2, startup_spread=30, seed=1)
    healthy = simulated_findings("n1", [], 8)
    assert not await core.observe("n1", healthy)  # healthy nodes spread their first write
    await clock.advance(31)
    assert await core.observe("n1", healthy)
    conds = {c["type"]: c for c in w.patches[-1][1]["status"]["conditions"]}
    assert set(conds) == {"GPUUnhealthy", "GPUXidError", "DiskUnhealthy", "NetworkUnreachable",
                          "MaintenanceScheduled"} and all(c["status"] == "False" for c in conds.values())
    for _ in range(20):  # steady state: no writes before the heartbeat
        await clock.advance(10)
        await core.observe("n1", healthy)
    assert len(w.patches) == 1
    bad = simulated_findings("n1", [parse_fault("xid:79")], 8)
    assert await core.observe("n1", bad)
    conds = {c["type"]: c for c in w.patches[-1][1]["status"]["conditions"]}
    assert conds["GPUXidError"]["status"] == "True" and conds["GPUXidError"]["reason"] == "Xid79"
    assert conds["GPUUnhealthy"]["reason"] == "GPULost"
    await clock.advance(400)
    assert await core.observe("n1", bad)  # heartbeat re-asserts (restores a clobbered list)
    beat = {c["type"]: c for c in w.patches[-1][1]["status"]["conditions"]}
    assert beat["GPUXidError"]["lastTransitionTime"] == conds["GPUXidError"]["lastTransitionTime"]
    assert beat["GPUXidError"]["lastHeartbeatTime"] != conds["GPUXidError"]["lastHeartbeatTime"]


class HeldWriter(Writer):
    """Holds every write until released; records how many were in flight at once."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()
        self.in_flight = self.most = 0

    async def write(self, node, patch):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await self.release.wait()
        self.in_flight -= 1
        await super().write(node, patch)


class Plan:
    def __init__(self, faults):
        self.faults = faults

    def read(self):
        return self.faults


async def test_simulated_fleet_writes_agents_concurrently_and_faults_first(tmp_path):
    """Simulated agents are independent: one cycle's writes are in flight together (bounded), not one at a
    time behind each other; a fault is written before the heartbeats due in the same cycle."""
    from fleetkeeper.health.agent import SimulatedFleet

    clock = FakeClock(NOW)
    w = HeldWriter()
    core = AgentCore(w, clock, heartbeat=300, startup_spread=30, seed=1)
    nodes = [(f"n{i:02d}", 8) for i in range(12)]
    plan = Plan({"n11": [parse_fault("ecc")]})
    fleet = SimulatedFleet(core, plan, lambda: nodes, concurrency=5)
    w.release.set()
    assert await fleet.cycle() == 1  # the fault at once; healthy nodes spread their first heartbeat
    w.release.clear()
    plan.faults = {"n05": [parse_fault("ecc")]}  # n11 repaired, n05 faulty
    await clock.advance(31)  # the other healthy nodes' first heartbeats are due too
    cycle = asyncio.ensure_future(fleet.cycle())
    for _ in range(50):
        await asyncio.sleep(0)
    assert w.in_flight == 5 and not cycle.done()  # as many as allowed at once, none finished yet
    first = {n for n, _ in w.patches}
    w.release.set()
    assert await cycle == 12 and w.most == 5
    wave = [n for n, _ in w.patches[1:6]]
    assert first == {"n11"} and {"n05", "n11"} <= set(wave)  # the two changes went out in the first wave


def test_heartbeats_of_many_agents_spread_out():
    import random

    from fleetkeeper.health.conditions import heartbeat_delay
    ds = [heartbeat_delay(300, 0.2, random.Random(i)) for i in range(1000)]
    assert min(ds) >= 240 and max(ds) <= 360 and max(ds) - min(ds) > 100


@pytest.mark.parametrize("fault,ctype,reason", [
    ("ecc", "GPUUnhealthy", "UncorrectableECC"), ("remap-pending", "GPUUnhealthy", "RemapPending"),
    ("gpu-missing", "GPUUnhealthy", "GPUMissing"), ("xid:48", "GPUXidError", "Xid48"),
    ("disk-full", "DiskUnhealthy", "DiskFull"), ("disk-ro", "DiskUnhealthy", "ReadOnlyFilesystem"),
    ("disk-io", "DiskUnhealthy", "IOErrors"), ("net-down", "NetworkUnreachable", "TargetsUnreachable"),
    ("maintenance:reboot", "MaintenanceScheduled", "AzureReboot"),
    ("maintenance:replace", "MaintenanceScheduled", "AzureTerminate"),
])
def test_simulated_faults_become_conditions(fault, ctype, reason):
    f = simulated_findings("n1", [parse_fault(fault)], 8)
    assert f[ctype] == Finding(ctype, True, reason, f[ctype].message)
    assert sum(1 for x in f.values() if x.problem) == 1


def test_flap_history_exports_what_matters_and_merges_back():
    from dataclasses import replace

    from fleetkeeper.health.controller import FlapTracker

    W = {"NetworkUnreachable"}

    def v(status, at, rv, name="f"):
        return replace(node([("NetworkUnreachable", status, "x", at)], name=name), resource_version=str(rv))
    ft = FlapTracker()
    # three transitions, each made by one write (resourceVersion) and stamped by the agent
    seq = [("False", "True", NOW - 100, 11), ("True", "False", NOW - 70, 12), ("False", "True", NOW - 40, 13)]
    prev, prev_rv = NOW - 200, 10
    for a, b, at, rv in seq:
        assert ft.observe("f", v(a, prev, prev_rv), v(b, at, rv), W, NOW)
        prev, prev_rv = at, rv
    ft.observe("old", v("False", NOW - 6000, 1), v("True", NOW - 5000, 2), W, NOW)
    assert ft.dirty
    data = ft.export(NOW, window=600, keep=2)
    assert data == {"f": [[NOW - 70, "NetworkUnreachable", "False", "12"],
                          [NOW - 40, "NetworkUnreachable", "True", "13"]]}
    fresh = FlapTracker()  # a restarted controller, or the standby replica that saw the same transitions
    fresh.observe("f", v("False", NOW - 70, 12), v("True", NOW - 40, 13), W, NOW + 1)  # seen live too
    fresh.observe("f", v("True", NOW - 40, 13), v("False", NOW - 10, 14), W, NOW + 1)
    assert not fresh.flapping("f", NOW, 3, 600)
    fresh.restore(data)  # rv 12 is new, rv 13 the same transition: counted once
    assert fresh.flapping("f", NOW, 3, 600) and not fresh.flapping("f", NOW, 4, 600)
    fresh.restore(data)  # idempotent
    assert not fresh.flapping("f", NOW, 4, 600)
    # two transitions to the same status within one second (a fast flap): still two, being two writes
    fast = FlapTracker()
    fast.observe("h", v("False", NOW, 20, "h"), v("True", NOW, 21, "h"), W, NOW)
    fast.observe("h", v("True", NOW, 21, "h"), v("False", NOW, 22, "h"), W, NOW)
    fast.observe("h", v("False", NOW, 22, "h"), v("True", NOW, 23, "h"), W, NOW)
    assert fast.flapping("h", NOW, 3, 600)
    # no lastTransitionTime from the writer: local time stands in
    ft2 = FlapTracker()
    assert ft2.observe("g", v("False", 0.0, 5, "g"), v("True", 0.0, 6, "g"), W, NOW)
    assert ft2.export(NOW, 600, 4) == {"g": [[NOW, "NetworkUnreachable", "True", "6"]]}


def test_state_configmap_bad_parts_are_named_and_left_out():
    import json

    from fleetkeeper.health.controller import FLAPS_KEY, STORM_UNTIL_KEY, parse_state

    good = {"f": [[NOW - 10, "NetworkUnreachable", "True", "7"]]}
    until, flaps, problems = parse_state({STORM_UNTIL_KEY: str(int(NOW)), FLAPS_KEY: json.dumps(good)})
    assert until == NOW and flaps.nodes() == ["f"] and problems == []
    until, flaps, problems = parse_state({STORM_UNTIL_KEY: "soon", FLAPS_KEY: json.dumps(good)})
    assert until == 0.0 and flaps.nodes() == ["f"] and "storm-until='soon' is not a time" in problems[0]
    for bad in ("{not json", json.dumps(["f"]), json.dumps({"f": [[NOW, "X", "True"]]}), json.dumps({"f": [["x", "T", "S", "1"]]})):
        until, flaps, problems = parse_state({STORM_UNTIL_KEY: str(int(NOW)), FLAPS_KEY: bad})
        assert until == NOW and flaps.nodes() == [] and problems and problems[0].startswith("flaps:"), bad
    assert parse_state({})[0] == 0.0


# --- gang repair windows --------------------------------------------------------------------------
def test_a_gang_drain_opens_one_repair_window_for_the_gangs_reset_class_nodes():
    from fleetkeeper.health.decide import gang_window

    from fleetkeeper.health.policy import Rule

    slow = Rule(type="GPUUnhealthy", reason="RemapPending", remedy="reset", trigger_after=3600)
    pol = P.model_copy(update={"rules": [slow, *P.rules]})
    lead = node([("GPUUnhealthy", "True", "UncorrectableECC", NOW - 100)], QT, q_ann(), name="lead")
    members = [
        lead,
        node([("GPUUnhealthy", "True", "RemapPending", NOW - 5)], name="pending-reset"),  # not yet sustained
        node([("GPUXidError", "True", "Xid79", NOW - 5)], name="active-reboot"),
        node([("GPUUnhealthy", "True", "GPUMissing", NOW - 5)], name="replace"),  # not reset-class
        node(name="healthy"),
        node([("GPUUnhealthy", "True", "UncorrectableECC", NOW - 50)], QT, q_ann(), name="quarantined-reset"),
        node([("GPUUnhealthy", "True", "UncorrectableECC", NOW - 50)], QT,
             q_ann(**{K.request: new_request("reset", "asked", "uid", NOW, 600).dumps()}), name="asked"),
        node([("GPUUnhealthy", "True", "UncorrectableECC", NOW - 50)], QT, q_ann(**{K.window: "ns/other@1"}),
             name="in-another-window"),
    ]
    wid, plans = gang_window(lead, members, ["ns/train"], pol, N, NOW)
    assert wid == f"ns/train@{int(NOW - 100)}"  # the gang and when the lead's disruption began
    got = {p.node: (p.kind, p.action, p.remedy) for p in plans}
    assert got == {"pending-reset": ("join_window", "drain", "reset"),
                   "active-reboot": ("join_window", "drain", "reboot"),
                   "quarantined-reset": ("mark_window", "drain", "reset")}
    assert [pr.type for pr in next(p for p in plans if p.node == "pending-reset").problems] == ["GPUUnhealthy"]
    # never more nodes newly out of service than the budget's cluster limit leaves; marks take nothing
    _, capped = gang_window(lead, members, ["ns/train"], pol, N, NOW, max_new=1)
    assert sorted(p.kind for p in capped) == ["join_window", "mark_window"]
    assert [p.kind for p in gang_window(lead, members, ["ns/train"], pol, N, NOW, max_new=0)[1]] == ["mark_window"]
    # a lead already in a window keeps its id (a restart re-opens the same window)
    again = node([("GPUUnhealthy", "True", "UncorrectableECC", NOW - 100)], QT,
                 q_ann(**{K.window: "ns/train@5"}), name="lead")
    assert gang_window(again, members, ["ns/train"], pol, N, NOW)[0] == "ns/train@5"


def test_the_nodes_of_a_window_are_repaired_together():
    c = [("GPUUnhealthy", "True", "UncorrectableECC", NOW - 100)]
    drained = q_ann(**{K.window: "ns/train@1"})
    p = decide_node(node(c, QT, drained), [], P, N, NOW, window_waiting=("n7",))
    assert p.kind == "wait" and p.wait == "window" and "n7" in p.why and p.requeue_after
    assert decide_node(node(c, QT, drained), [], P, N, NOW).kind == "request_action"
    # the wait only holds back the repair request, never a drain or a termination
    assert decide_node(node(c, QT, drained), [pod("a")], P, N, NOW, window_waiting=("n7",)).kind == "evict"


def test_a_window_is_one_unit_of_the_budget():
    from fleetkeeper.lifecycle import budget as bud
    from fleetkeeper.lifecycle.config import BudgetConfig

    def q(name, window="", since=NOW - 10):
        ann = {K.since: str(int(since))}
        if window:
            ann[K.window] = window
        return node([], QT, ann, name=name, rack=f"rack-{name}")
    nodes = [q("a", "ns/g@1"), q("b", "ns/g@1", since=NOW - 5), q("c", "ns/g@1"), q("d"), node(name="e")]
    cfg = BudgetConfig(cluster={"max_nodes": 2}, max_new_per_window=2)
    snap = bud.snapshot(nodes, N, cfg)
    assert snap.used("cluster") == 2 and snap.used("rack:rack-a") == 1
    used, recent = bud.usage(snap, {}, cfg, NOW)
    assert used["cluster"] == 2 and recent == 2  # the window began once
    assert not bud.admit("e", ("cluster",), snap, {}, cfg, NOW).admitted
    # without the window, the same four nodes are four units
    plain = bud.snapshot([q("a"), q("b"), q("c"), q("d")], N, cfg)
    assert plain.used("cluster") == 4
