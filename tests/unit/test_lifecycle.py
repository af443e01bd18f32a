"""The node lifecycle, the disruption budget and gang evictions: table tests, no I/O, no sleeps."""

from dataclasses import replace

import pytest

from fleetkeeper.core.domain import ZONE_LABEL, Names
from fleetkeeper.core.plan import AddTaint, Event, SetAnnotation, TerminateMachine
from fleetkeeper.core.views import Condition, NodeView, PodView, Taint
from fleetkeeper.lifecycle import machine as m
from fleetkeeper.lifecycle.budget import InFlight, Ledger, admit, disrupted_since, snapshot
from fleetkeeper.lifecycle.config import BudgetConfig, LifecycleConfig, load_lifecycle
from fleetkeeper.lifecycle.gangs import checkpoint_wait, gang_evictions, gang_of
from fleetkeeper.lifecycle.keys import HealthKeys, PreflightFactKeys, RecordKeys

N = Names("d")
HK, PK, RK = HealthKeys(N), PreflightFactKeys(N), RecordKeys(N)
CFG = LifecycleConfig()
NOW = 1_000_000.0
H = 3600.0


def F(**kw) -> m.Facts:
    return m.Facts(node="n1", **kw)


# --- states -------------------------------------------------------------------------------------
@pytest.mark.parametrize("facts,state", [
    (F(deleting=True), m.TERMINATED),
    (F(up=False), m.JOINING),
    (F(up=False, gated=True, gate_label="pending"), m.JOINING),
    (F(gated=True, gate_label="pending"), m.VALIDATING),
    (F(gated=True, gate_label="failed", attempts=1), m.VALIDATING),
    (F(gated=True, gate_label="failed", attempts=3, failed_check="nccl"), m.RETIRING),
    (F(), m.IN_SERVICE),
    (F(up=False, validated_at=5.0), m.IN_SERVICE),  # a validated node that is NotReady is health's business
    (F(faults=("GPUUnhealthy",)), m.SUSPECT),
    (F(quarantined=True, action="quarantine"), m.QUARANTINED),
    (F(quarantined=True, action="drain", pods_left=3), m.DRAINING),
    (F(quarantined=True, action="drain", remedy="reset"), m.AWAITING_REPAIR),
    (F(quarantined=True, action="terminate", pods_left=1), m.DRAINING),
    (F(quarantined=True, action="terminate"), m.RETIRING),
    (F(gated=True, gate_label="pending", handed_to_gate=True), m.REVALIDATING),
    (F(gated=True, gate_label="failed", attempts=1, validated_at=5.0), m.REVALIDATING),  # periodic failure
    (F(gated=True, gate_label="failed", attempts=3, handed_to_gate=True), m.RETIRING),  # revalidation used up
    (F(state=m.RETIRING), m.RETIRING),  # sticky
    (F(terminate_requested=5.0), m.RETIRING),
])
def test_every_state_from_its_facts(facts, state):
    assert m.state_of(facts, CFG)[0] == state


def test_awaiting_repair_names_what_it_waits_for():
    assert "maintenance" in m.state_of(F(quarantined=True, action="drain", remedy="wait"), CFG)[1]
    assert "reboot" in m.state_of(F(quarantined=True, action="drain", remedy="reboot"), CFG)[1]


# --- record, deadlines and escalations ----------------------------------------------------------
def ops_of(d, typ):
    return [o for o in d.plan.ops if isinstance(o, typ)]


def test_since_comes_from_the_first_action_so_a_restart_resumes_without_a_write():
    f = F(quarantined=True, action="quarantine", health_reason="GPUUnhealthy/ECC", health_since=NOW - 100)
    d = m.decide(f, CFG, N, NOW)
    assert d.state == m.QUARANTINED and d.since == NOW - 100
    assert d.deadline == NOW - 100 + CFG.deadlines.quarantined
    assert d.plan.node_ops == ()  # nothing to write: the state is derived from health's own markers
    assert d.plan.requeue_after == pytest.approx(CFG.deadlines.quarantined - 100 + 0.5)
    # escalated to drain: the draining and repair deadlines still count from the quarantine
    assert m.decide(replace(f, action="drain", pods_left=1), CFG, N, NOW).since == NOW - 100
    assert m.decide(replace(f, action="drain"), CFG, N, NOW).since == NOW - 100
    # components fold the record into their own writes
    rec = {o.key: o.value for o in m.record_ops(N, m.QUARANTINED, "x", NOW)}
    assert rec[RK.state] == m.QUARANTINED and rec[RK.since] == str(int(NOW))


@pytest.mark.parametrize("facts,escalation,check", [
    # a repair that never comes: replace (retire) after awaiting_repair, counted from the drain's start
    (F(quarantined=True, action="drain", remedy="reset", health_since=NOW - 4 * H - 1),
     "replace", lambda ann: ann[RK.state] == m.RETIRING),
    # quarantined for investigation too long: drain
    (F(quarantined=True, action="quarantine", health_since=NOW - 25 * H),
     "drain", lambda ann: ann[HK.action] == "drain"),
    # a drain still blocked by a PodDisruptionBudget past its deadline: retire
    (F(quarantined=True, action="drain", pods_left=2, health_since=NOW - 7 * 24 * H - 1),
     "retire", lambda ann: ann[RK.state] == m.RETIRING),
    # re-validation never passes: retire (no longer stuck in "validating")
    (F(gated=True, gate_label="failed", attempts=1, handed_to_gate=True, gated_at=NOW - 6 * H - 1), "retire", lambda ann: ann[RK.state] == m.RETIRING),
    (F(up=False, created=NOW - H - 1), "retire", lambda ann: ann[RK.state] == m.RETIRING),
    (F(gated=True, gate_label="pending", gated_at=NOW - 6 * H - 1), "retire",
     lambda ann: ann[RK.state] == m.RETIRING),
    (F(faults=("DiskUnhealthy",), fault_since=NOW - H - 1), "report",
     lambda ann: ann[RK.escalated] == f"{m.SUSPECT}@{int(NOW - H - 1)}"),
])
def test_every_deadline_escalates_once(facts, escalation, check):
    d = m.decide(facts, CFG, N, NOW)
    assert d.escalation == escalation
    ann = {o.key: o.value for o in ops_of(d, SetAnnotation)}
    assert check(ann)
    assert any(e.type == "Warning" for e in ops_of(d, Event))
    if escalation in ("report", "drain"):
        # recorded as escalated: the next pass does not escalate again
        after = m.decide(replace(facts, escalated=ann[RK.escalated]), CFG, N, NOW + 60)
        assert after.escalation == "" and not ops_of(after, Event)


def test_retiring_taints_records_then_terminates_once():
    f = F(gated=True, gate_label="failed", attempts=3, failed_check="nccl", state=m.VALIDATING, since=NOW - 60)
    d = m.decide(f, CFG, N, NOW)
    assert d.state == m.RETIRING and d.escalation == "retire" and "nccl" in d.reason
    ops = d.plan.ops
    assert AddTaint(N.quarantine, "retiring") in ops
    assert ops.index(SetAnnotation(RK.terminate_requested, str(int(NOW)))) < ops.index(
        next(o for o in ops if isinstance(o, TerminateMachine)))
    # after the request is recorded (a restart, too): never asked again
    later = m.decide(replace(f, state=m.RETIRING, since=NOW, terminate_requested=NOW), CFG, N, NOW + 30)
    assert later.plan.machine is None
    # the machine does not go: an operator is told, once
    stuck = m.decide(replace(f, state=m.RETIRING, since=NOW, terminate_requested=NOW), CFG, N, NOW + 2 * H)
    assert stuck.escalation == "report" and stuck.plan.machine is None
    assert m.decide(replace(f, state=m.RETIRING, since=NOW, terminate_requested=NOW,
                            escalated=f"{m.RETIRING}@{int(NOW)}"),
                    CFG, N, NOW + 3 * H).escalation == ""


def test_a_termination_interrupted_after_its_record_is_asked_again_of_an_idempotent_provider():
    """A process killed between recording the request and the provider's answer: the machine layer (durable
    ledger, never acts twice) is asked again until the Node goes; any other provider is never asked twice."""
    f = F(gated=True, gate_label="failed", attempts=3, failed_check="nccl", state=m.RETIRING, since=NOW,
          terminate_requested=NOW)
    first = m.decide(replace(f, state="", since=0.0, terminate_requested=0.0), CFG, N, NOW, provider_idempotent=True)
    [announced] = ops_of(first, Event)
    assert announced.reason == "Retiring" and announced.id == f"retire@{int(NOW)}"
    again = m.decide(f, CFG, N, NOW + 30, provider_idempotent=True)
    assert again.plan.machine is not None and again.plan.action == "terminate-check"
    assert not ops_of(again, SetAnnotation) and again.plan.requeue_after == 30.0
    # announced again, as the same occurrence (its Event may have died with the process): one Event in the API
    assert [e.id for e in ops_of(again, Event)] == [announced.id]
    plain = m.decide(f, CFG, N, NOW + 30)
    assert plain.plan.machine is None and [e.id for e in ops_of(plain, Event)] == [announced.id]
    # a node on health's terminate ladder is health's to announce
    health = replace(f, quarantined=True, action="terminate")
    assert not ops_of(m.decide(health, CFG, N, NOW + 30, provider_idempotent=True), Event)
    # past the retiring deadline: reported once, as before
    stuck = m.decide(f, CFG, N, NOW + 2 * H, provider_idempotent=True)
    assert stuck.escalation == "report" and stuck.plan.machine is None


def test_escalation_can_be_reported_only():
    cfg = load_lifecycle("escalate: false")
    d = m.decide(F(quarantined=True, action="quarantine", health_since=NOW - 25 * H), cfg, N, NOW)
    ann = {o.key: o.value for o in ops_of(d, SetAnnotation)}
    assert HK.action not in ann and ann[RK.escalated].startswith(m.QUARANTINED)
    retiring = m.decide(F(gated=True, gate_label="failed", attempts=3), cfg, N, NOW)
    assert retiring.plan.machine is None


def test_in_service_and_terminated_have_no_deadline_and_an_operator_can_take_over():
    assert m.decide(F(state=m.IN_SERVICE, since=NOW - 1e7), CFG, N, NOW).deadline is None
    assert m.decide(F(deleting=True), CFG, N, NOW).plan.ops == ()
    d = m.decide(F(quarantined=True, action="quarantine", ignored=True, state=m.QUARANTINED, since=1.0), CFG, N, NOW)
    assert d.plan.ops == ()


def test_config_errors_name_the_field():
    with pytest.raises(Exception, match="deadlines.joining"):
        load_lifecycle("deadlines: {joining: soon}")


def node(name, *, zone="z1", rack="r1", quarantined=False, gated=False, validated=False, since=0.0, labels=None,
         conditions=()):
    lab = {ZONE_LABEL: zone, N.rack: rack, **(labels or {})}
    ann = {}
    taints = []
    if quarantined:
        taints.append(Taint(N.quarantine, "x", "NoSchedule"))
        ann[HK.since] = str(since)
    if gated:
        taints.append(Taint(N.preflight, "failed", "NoSchedule"))
        ann[PK.gated_at] = str(since)
    if validated:
        ann[PK.validated_at] = "5"
    return NodeView(name, "u-" + name, "1", lab, ann, tuple(taints), False, tuple(conditions), 8, 1000, 0.0, False)


def test_facts_are_read_from_the_node_markers():
    n = node("a", quarantined=True, since=NOW - 5, conditions=(Condition("GPUUnhealthy", "True", "ECC", "", 0.0),
                                                               Condition("Ready", "True", "", "", 0.0)))
    f = m.facts_of(n, N, pods_left=2)
    assert f.quarantined and f.health_since == NOW - 5 and f.faults == ("GPUUnhealthy",) and f.pods_left == 2
    assert f.up


# --- budget ---------------------------------------------------------------------------------------
BUDGET = BudgetConfig(cluster={"max_nodes": 3}, zone={"max_percent": 100}, rack={"max_nodes": 2},
                      labels={"pdu": {"max_nodes": 1}}, max_new_per_window=10)


def test_what_counts_as_out_of_service():
    assert disrupted_since(node("a", quarantined=True, since=7.0), N) == 7.0
    assert disrupted_since(node("b", gated=True, validated=True, since=9.0), N) == 9.0  # periodic re-test failure
    assert disrupted_since(node("c", gated=True), N) is None  # a joining node was never capacity
    assert disrupted_since(node("d"), N) is None
    handed_back = node("e", gated=True, validated=True, since=9.0)
    handed_back = NodeView(**{**{f: getattr(handed_back, f) for f in handed_back.__slots__},
                              "annotations": {**handed_back.annotations, HK.state: "validating"}})
    assert disrupted_since(handed_back, N) is None  # a repaired node back at the gate released its unit


@pytest.mark.parametrize("fleet,inflight,candidate,admitted,over", [
    # room everywhere
    ([node("a"), node("b"), node("c", rack="r2"), node("d", rack="r2")], {}, "a", True, ()),
    # the rack is full (2) from the cluster's record
    ([node("a", quarantined=True, since=NOW), node("b", quarantined=True, since=NOW), node("c"), node("d", rack="r2")],
     {}, "c", False, ("rack:r1",)),
    # an in-flight admission (not yet in the cache) counts
    ([node("a", quarantined=True, since=NOW), node("b"), node("c"), node("d", rack="r2")],
     {"b": InFlight("b", "quarantine", NOW, ("cluster", "zone:z1", "rack:r1"))}, "c", False, ("rack:r1",)),
    # preflight's periodic failure and health's quarantine share the cluster budget (3)
    ([node("a", quarantined=True, since=NOW), node("b", gated=True, validated=True, since=NOW, rack="r2"),
      node("c", rack="r3", zone="z2"), node("e", rack="r4", zone="z2"), node("f", rack="r5", zone="z2"),
      node("g", rack="r6", zone="z2")],
     {"c": InFlight("c", "retest", NOW, ("cluster", "zone:z2", "rack:r3"))}, "e", False, ("cluster",)),
    # a node already out of service is free (drain / terminate of a quarantined node)
    ([node("a", quarantined=True, since=NOW), node("b", quarantined=True, since=NOW), node("c")],
     {}, "a", True, ()),
    # an operator-named label scope
    ([node("a", labels={"pdu": "p1"}, quarantined=True, since=NOW), node("b", labels={"pdu": "p1"}, rack="r2"),
      node("c", rack="r3"), node("d", rack="r4")], {}, "b", False, ("label:pdu=p1",)),
])
def test_budget_admission(fleet, inflight, candidate, admitted, over):
    snap = snapshot(fleet, N, BUDGET)
    v = admit(candidate, snap.scopes[candidate], snap, inflight, BUDGET, NOW)
    assert v.admitted == admitted and v.over == over
    assert ("admitted" if admitted else "used up") in v.explain() or v.free


def test_budget_window_counts_recorded_and_in_flight_starts():
    cfg = BudgetConfig(cluster={"max_nodes": 100}, zone={}, rack={}, max_new_per_window=2, window=H)
    fleet = [node("a", quarantined=True, since=NOW - 10), node("old", quarantined=True, since=NOW - 2 * H),
             node("b", rack="r2"), node("c", rack="r3")]
    snap = snapshot(fleet, N, cfg)
    assert admit("b", snap.scopes["b"], snap, {}, cfg, NOW).admitted
    fl = {"b": InFlight("b", "quarantine", NOW, snap.scopes["b"])}
    assert admit("c", snap.scopes["c"], snap, fl, cfg, NOW).over == ("window",)


def test_storm_of_30_percent_is_held_to_the_budget_by_in_flight_admissions():
    cfg = BudgetConfig(cluster={"max_nodes": 5}, zone={}, rack={}, max_new_per_window=None)
    fleet = [node(f"n{i}", rack=f"r{i}") for i in range(20)]
    snap = snapshot(fleet, N, cfg)
    ledger = Ledger()
    admitted = []
    for i in range(6):  # 30 % of 20 fault at once, before the cache shows any of them
        name = f"n{i}"
        if admit(name, snap.scopes[name], snap, ledger.view(), cfg, NOW).admitted:
            ledger.add(InFlight(name, "quarantine", NOW, snap.scopes[name]))
            admitted.append(name)
    assert len(admitted) == 5
    # the writes land: the cache shows them, the ledger forgets them, the count stays
    fleet2 = [node(f"n{i}", rack=f"r{i}", quarantined=f"n{i}" in admitted, since=NOW) for i in range(20)]
    snap2 = snapshot(fleet2, N, cfg)
    ledger.settle(snap2, NOW + 1)
    assert len(ledger) == 0
    assert not admit("n5", snap2.scopes["n5"], snap2, ledger.view(), cfg, NOW + 1).admitted


def test_ledger_forgets_writes_that_never_landed():
    ledger = Ledger()
    ledger.add(InFlight("a", "quarantine", NOW, ("cluster",)))
    ledger.add(InFlight("b", "quarantine", NOW, ("cluster",), dry_run=True))
    ledger.settle(snapshot([], N, BUDGET), NOW + 500)
    assert set(ledger.view()) == {"b"}  # dry-run "quarantines" stay counted, as if they had happened


# --- gangs ------------------------------------------------------------------------------------------
def pod(name, node_name, *, gang="", group="", cosched="", phase="Running", deleting=False, ann=None, owner="Job"):
    labels = {}
    if gang:
        labels[N.gang] = gang
    if cosched:
        labels["scheduling.x-k8s.io/pod-group"] = cosched
    return PodView("ns", name, "u" + name, "1", node_name, phase, 0, "", labels, dict(ann or {}), owner, "j", (), 1,
                   deleting, 0.0, "", "", "", "", "", pod_group=group)


def test_gang_of_in_tree_coscheduling_and_label():
    assert gang_of(pod("a", "n", group="g1", gang="other"), N) == "ns/g1"
    assert gang_of(pod("a", "n", cosched="g2"), N) == "ns/g2"
    assert gang_of(pod("a", "n", gang="g3"), N) == "ns/g3"
    assert gang_of(pod("a", "n"), N) == ""


def test_a_drain_evicts_the_whole_gang_and_each_pod_once():
    members = [pod(f"w{i}", f"n{i}", gang="train") for i in range(8)]
    members.append(pod("done", "n5", gang="train", phase="Succeeded"))
    members.append(pod("going", "n6", gang="train", deleting=True))
    on_node = [members[0], pod("solo", "n0"), pod("ds", "n0", owner="DaemonSet")]
    out, gangs = gang_evictions(on_node, lambda g: members if g == "ns/train" else [], N)
    assert gangs == ["ns/train"]
    assert sorted(p.name for p in out) == sorted(["solo"] + [f"w{i}" for i in range(8)])


def test_checkpoint_grace_waits_within_the_deadline():
    ps = [pod("a", "n", ann={RK.checkpoint_grace: "10m"}), pod("b", "n", ann={RK.checkpoint_grace: "bogus"})]
    assert checkpoint_wait(ps, N, NOW, NOW + 60, NOW + 7 * 24 * H) == 540
    assert checkpoint_wait(ps, N, NOW, NOW + 60, NOW + 120) == 60  # never past the deadline
    assert checkpoint_wait(ps, N, NOW, NOW + 601, NOW + H) == 0
    assert checkpoint_wait([pod("c", "n")], N, NOW, NOW, NOW + H) == 0


def test_health_and_preflight_use_the_lifecycle_names():
    from fleetkeeper.health.decide import Keys
    from fleetkeeper.preflight.keys import Keys as PKeys

    assert Keys(N).since == HK.since and Keys(N).action == HK.action
    pk = PKeys(N)
    assert (pk.attempts, pk.failed_check, pk.gated_at, pk.gate, pk.validated_at) == (
        PK.attempts, PK.failed_check, PK.gated_at, PK.gate, PK.validated_at)


@pytest.mark.parametrize("out,asks,want", [
    # room for two: the first two are admitted, each counted against the next
    (0, ["a", "b", "c"], [True, True, False]),
    # a node out of service already holds its unit: free, and it takes no room from the others
    (1, ["n0", "a", "b"], [True, True, False]),
    # spent by the nodes out of service: nothing new
    (2, ["a"], [False]),
])
def test_admitter_counts_each_admission_against_the_next(out, asks, want):
    from fleetkeeper.lifecycle.budget import Admitter

    cfg = BudgetConfig(cluster={"max_nodes": 2}, zone={"max_percent": 100}, rack={"max_nodes": 10},
                       max_new_per_window=None)
    nodes = [node(f"n{i}", quarantined=i < out, since=100.0) for i in range(out)]
    nodes += [node(x) for x in ("a", "b", "c")]
    ad = Admitter(snapshot(nodes, N, cfg), {}, cfg, 200.0, "team-replace")
    assert [ad(x).admitted for x in asks] == want
    assert sorted(ad.added) == sorted(x for x, ok in zip(asks, want) if ok and not x.startswith("n"))
    assert all(f.kind == "team-replace" for f in ad.added.values())
