"""Balloons yield to waiting work as a unit: which balloons to release, table by table."""

from __future__ import annotations

import dataclasses

from fleetkeeper.capacity import yielding as yd
from fleetkeeper.capacity.controller import room_verdicts
from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import Condition, NodeView, PodView, Taint, Toleration

N = Names()
NOW = 1_800_000_000.0
POOL = "gpu"


def node(name: str, gpus: int = 8, taints=()) -> NodeView:
    return NodeView(name, "u-" + name, "1", {N.pool: POOL}, {}, tuple(Taint(*t) for t in taints), False,
                    (Condition("Ready", "True", "", "", 0),), gpus, 96000, NOW - 1e4, False)


def waiting(name: str, gang: str = "", gpus: int = 8, prio: int = 0, created: float = NOW - 60,
            unschedulable: bool = True, selector=((N.pool, POOL),), tolerations=(), node_names=()) -> yd.WaitingPod:
    return yd.WaitingPod("ns", name, "u-" + name, prio, gpus, tuple(selector), tuple(node_names), (),
                         tuple(tolerations), gang, created, unschedulable, NOW - 30 if unschedulable else 0.0, "",
                         False, False, "Pending")


def work(name: str, node_name: str, gpus: int = 8) -> PodView:
    return PodView("ns", name, "u-" + name, "1", node_name, "Running", 0, "", {}, {}, "Job", "j", (), gpus, False,
                   NOW - 100, "", "", "", "", "")


def balloon(node_name: str, released: bool = False) -> yd.Balloon:
    return yd.Balloon("fk", f"balloon-{node_name}", node_name, 8.0, released)


def gang(name: str, n: int, **kw) -> list[yd.WaitingPod]:
    return [waiting(f"{name}-{i}", gang=name, **kw) for i in range(n)]


def decide(nodes, bound, balloons, pods, budget=100):
    return yd.decide(POOL, nodes, bound, balloons, yd.units(pods, -1000), N, budget)


def test_a_gang_gets_exactly_the_balloons_it_needs_in_one_release():
    nodes = [node(f"n{i}") for i in range(6)]
    out = decide(nodes, [], [balloon(n.name) for n in nodes], gang("train", 4))
    assert len(out.releases) == 1
    rel = out.releases[0]
    assert rel.unit == "ns/train" and rel.pods == 4 and rel.amount == 32 and len(rel.balloons) == 4
    assert out.kept == 2 and out.hold


def test_free_room_is_used_before_any_balloon_is_released():
    nodes = [node(f"n{i}") for i in range(4)]
    balloons = [balloon("n0"), balloon("n1")]  # n2, n3 are empty
    out = decide(nodes, [], balloons, gang("train", 3))
    assert [b.node for r in out.releases for b in r.balloons] == ["n0"]  # two free nodes + one balloon node
    assert out.kept == 1


def test_a_gang_that_cannot_fit_whole_releases_nothing():
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work("busy-0", "n0"), work("busy-1", "n1")]
    out = decide(nodes, bound, [balloon("n2"), balloon("n3")], gang("train", 3))
    assert out.releases == [] and out.kept == 2
    assert out.hold  # it fits the pool once the running job ends: new balloons must not take that room


def test_a_gang_bigger_than_the_pool_does_not_hold_the_pool():
    nodes = [node(f"n{i}") for i in range(2)]
    out = decide(nodes, [], [balloon("n0"), balloon("n1")], gang("huge", 3))
    assert out.releases == [] and not out.hold and out.unfit == ["ns/huge"]


def test_units_are_served_by_priority_then_age_and_each_whole():
    nodes = [node(f"n{i}") for i in range(5)]
    pods = gang("young", 2, created=NOW - 10) + gang("old", 2, created=NOW - 100) + \
        gang("urgent", 2, prio=100, created=NOW - 1)
    out = decide(nodes, [], [balloon(n.name) for n in nodes], pods)
    assert [r.unit for r in out.releases] == ["ns/urgent", "ns/old"]  # 'young' (2) no longer fits the 1 node left
    assert out.kept == 1


def test_budget_is_never_split_and_no_younger_unit_overtakes():
    nodes = [node(f"n{i}") for i in range(6)]
    pods = gang("big", 4, created=NOW - 100) + [waiting("single", created=NOW - 5)]
    out = decide(nodes, [], [balloon(n.name) for n in nodes], pods, budget=3)
    assert out.releases == [] and out.over_budget == ["ns/big", "ns/pod/single"]
    out = decide(nodes, [], [balloon(n.name) for n in nodes], pods, budget=5)
    assert [(r.unit, len(r.balloons)) for r in out.releases] == [("ns/big", 4), ("ns/pod/single", 1)]


def test_released_balloons_count_as_free_and_are_not_released_twice():
    nodes = [node(f"n{i}") for i in range(4)]
    balloons = [balloon("n0", released=True), balloon("n1", released=True), balloon("n2"), balloon("n3")]
    out = decide(nodes, [], balloons, gang("train", 2))
    assert out.releases == [] and out.kept == 2 and out.hold  # room already freeing: hold, release nothing more


def test_work_not_yet_tried_by_the_scheduler_or_below_balloons_is_not_waiting():
    pods = gang("fresh", 2, unschedulable=False) + [waiting("lowly", prio=-2000)] + \
        [waiting("cpu-only", gpus=0)]
    assert yd.units(pods, -1000) == []
    # one member tried is enough: the gang is one unit of all its unbound members
    pods = [waiting("g-0", gang="g", unschedulable=True), waiting("g-1", gang="g", unschedulable=False)]
    (u,) = yd.units(pods, -1000)
    assert u.key == "ns/g" and len(u.pods) == 2


def fresh(p: yd.WaitingPod, **kw) -> yd.WaitingPod:
    """Just created: the scheduler has not looked at it yet (no PodScheduled condition)."""
    return dataclasses.replace(p, unschedulable=False, unschedulable_since=0.0, tried=False, **kw)


def test_work_the_scheduler_has_not_tried_yet_gets_its_balloons_before_the_first_try():
    nodes = [node(f"n{i}") for i in range(3)]
    balloons = [balloon(n.name) for n in nodes]
    # a pod of its own, just created: its balloon goes now, so the scheduler's first try finds room
    # instead of preempting one victim and waiting for it and its backoff
    out = decide(nodes, [], balloons, [fresh(waiting("solo"))])
    assert [r.unit for r in out.releases] == ["ns/pod/solo"] and out.hold
    # one with scheduling gates is held on purpose: not waiting for room
    assert yd.units([fresh(waiting("gated"), gated=True)], -1000) == []
    # a gang not tried yet counts once its group and all its members are there (the scheduler's PreEnqueue
    # lets it in now), not before
    members = [fresh(p) for p in gang("train", 2)]
    assert yd.units(members, -1000) == []
    assert yd.units(members, -1000, complete=lambda key: False) == []
    (u,) = yd.units(members, -1000, complete=lambda key: key == "ns/train")
    assert u.key == "ns/train" and len(u.pods) == 2
    out = yd.decide(POOL, nodes, [], balloons, [u], N, 100)
    assert len(out.releases[0].balloons) == 2
    # the projector tells the two apart
    proj = yd.waiting_pod_projector(N)
    base = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": {}, "status": {}}
    assert proj(base).tried is False and proj(base).gated is False
    tried = {**base, "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": "0/3 nodes", "lastTransitionTime": "2027-01-01T00:00:00Z"}]}}
    assert proj(tried).tried and proj(tried).scheduled_note == "False|Unschedulable|0/3 nodes|2027-01-01T00:00:00Z"
    assert proj({**base, "spec": {"schedulingGates": [{"name": "x"}]}}).gated


def test_eligibility_follows_selectors_taints_and_pinned_nodes():
    nodes = [node("n0", taints=[("fleetkeeper.io/preflight", "pending", "NoSchedule")]), node("n1"), node("n2")]
    balloons = [balloon("n1"), balloon("n2")]
    # a periodic re-test pinned to n2 (preemptionPolicy Never: the scheduler never frees the node for it)
    pinned = waiting("pf-periodic-n2", node_names=("n2",), prio=-100,
                     tolerations=(Toleration(N.team, "Exists", "", ""),))
    out = decide(nodes, [], balloons, [pinned])
    assert [b.node for r in out.releases for b in r.balloons] == ["n2"]
    other_pool = waiting("elsewhere", selector=((N.pool, "cpu"),))
    out = decide(nodes, [], balloons, [other_pool])
    assert out.releases == [] and not out.hold


def test_projection_reads_what_the_decision_needs():
    obj = {"metadata": {"name": "p", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z",
                        "labels": {}},
           "spec": {"priority": 5, "schedulingGroup": {"podGroupName": "g"}, "nodeSelector": {N.pool: "gpu"},
                    "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In",
                                                                "values": ["n1"]}]}]}}}},
           "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                          "reason": "Unschedulable",
                                                          "lastTransitionTime": "2026-01-01T00:00:05Z"}]}}
    p = yd.waiting_pod_projector(N)(obj)
    assert (p.unit, p.gpus, p.priority, p.node_names, p.unschedulable, p.node_selector) == \
        ("ns/g", 8, 5, ("n1",), True, ((N.pool, "gpu"),))


# --- no starvation: reservations -------------------------------------------------

from fleetkeeper.capacity import reserve as rs  # noqa: E402


def reserve(nodes, bound, pods, after=300.0, balloons=(), turn="created"):
    """``turn``: the head as the last pass left it; "created": the first unit has been the head since it
    was created (nothing was ahead of it)."""
    units = yd.units(pods, -1000)
    y = yd.decide(POOL, nodes, bound, list(balloons), units, N, 100)
    if turn == "created":
        turn = (units[0].key, units[0].since) if units else None
    return rs.decide(POOL, nodes, bound, units, y.blocked, N, NOW, after, turn=turn), y


def test_a_gang_waiting_past_the_threshold_gets_the_free_nodes_reserved():
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work("small-0", "n0"), work("small-1", "n1")]  # n2, n3 free; the big gang needs all four
    big = gang("big", 4, created=NOW - 400)
    small = gang("small2", 1, created=NOW - 10)
    plan, y = reserve(nodes, bound, big + small)
    assert y.blocked == ["ns/big"]
    # all four at once: the free ones first, then the busy ones (their work runs on, nothing new starts)
    assert plan.unit == "ns/big" and plan.needed == 4 and plan.taint == ["n2", "n3", "n0", "n1"]
    assert plan.tolerate == [f"ns/big-{i}" for i in range(4)]
    # below the threshold: nothing reserved
    plan, _ = reserve(nodes, bound, gang("big", 4, created=NOW - 100))
    assert plan.unit == "" and plan.taint == []


def test_no_younger_gang_is_let_go_onto_nodes_reserved_in_the_same_pass():
    """The reservation and the yield are judged together (``reserve.settle``): the pass that reserves the
    free nodes for the starving gang does not also find that a younger gang fits there (its PodGroup would
    be created, its cycle would fail on the new taint and back it off)."""
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work("small-0", "n0"), work("small-1", "n1")]  # n2, n3 free; the big gang needs all four
    pods = gang("big", 4, created=NOW - 400) + gang("small2", 1, created=NOW - 10)
    units = yd.units(pods, -1000)
    alone = yd.decide(POOL, nodes, bound, [], units, N, 100)
    assert "ns/small2" in alone.free  # judged alone, the younger gang fits the room about to be reserved
    y, plan = rs.settle(POOL, nodes, bound, [], units, N, 100, NOW, 300.0, turn=("ns/big", NOW - 400))
    assert plan.unit == "ns/big" and plan.taint == ["n2", "n3", "n0", "n1"]
    assert "ns/small2" not in y.fits and "ns/small2" not in y.free and "ns/small2" in y.blocked
    assert y.blocked[0] == "ns/big" and "ns/big" not in y.unfit  # the gang still counts its reserved room
    # below the threshold nothing is reserved and the younger gang goes as before
    y, plan = rs.settle(POOL, nodes, bound, [], units, N, 100, NOW, 600.0, turn=("ns/big", NOW - 400))
    assert plan.unit == "" and "ns/small2" in y.free


def test_balloons_on_nodes_reserved_in_the_same_pass_are_not_released_for_younger_work():
    nodes = [node(f"n{i}") for i in range(3)]
    bound = [work("w0", "n0")]  # n1, n2 hold balloons; the big gang needs all three
    balloons = [balloon("n1"), balloon("n2")]
    pods = gang("big", 3, created=NOW - 400) + gang("young", 1, created=NOW - 10)
    units = yd.units(pods, -1000)
    assert [r.unit for r in yd.decide(POOL, nodes, bound, balloons, units, N, 100).releases] == ["ns/young"]
    y, plan = rs.settle(POOL, nodes, bound, balloons, units, N, 100, NOW, 300.0, turn=("ns/big", NOW - 400))
    assert plan.unit == "ns/big" and sorted(plan.reserved) == ["n0", "n1", "n2"]
    assert all(r.unit != "ns/young" for r in y.releases) and "ns/young" in y.blocked


def test_work_kept_off_only_by_a_reservation_waits_held_it_is_not_unfit_nor_another_pools():
    """Every node of the pool reserved for the starving gang: a younger gang is blocked (fleetkeeper keeps
    holding it), not unfit and not left out as another pool's work, either of which would hand its PodGroup
    to kube-scheduler at once, to fail on the reservation taints until they go."""
    tok = rs.token("ns/big")
    key = rs.reserved_key(N)
    nodes = [node(f"n{i}", taints=[(key, tok, "NoSchedule")]) for i in range(3)]
    bound = [work("w0", "n0")]
    tol = (Toleration(key, "Equal", tok, "NoSchedule"),)
    units = yd.units(gang("big", 3, created=NOW - 400, tolerations=tol) + gang("young", 1, created=NOW - 10), -1000)
    y, plan = rs.settle(POOL, nodes, bound, [], units, N, 100, NOW, 300.0)
    assert plan.unit == "ns/big" and plan.taint == [] and plan.untaint == []
    assert y.blocked == ["ns/big", "ns/young"] and y.unfit == [] and y.fits == []
    # without the reservation key as transient the younger gang is not this pool's work at all
    assert "ns/young" not in yd.decide(POOL, nodes, bound, [], units, N, 100).blocked


def reserved_node(name: str, tok: str) -> NodeView:
    return node(name, taints=[(rs.reserved_key(N), tok, "NoSchedule")])


def test_a_reservation_grows_as_nodes_free_and_keeps_other_work_off():
    tok = rs.token("ns/big")
    nodes = [node("n0"), node("n1"), reserved_node("n2", tok), reserved_node("n3", tok)]
    bound = [work("x", "n1")]  # n0 freed since the last pass
    tol = (Toleration(rs.reserved_key(N), "Equal", tok, "NoSchedule"),)
    big = gang("big", 4, created=NOW - 400, tolerations=tol)
    small = gang("small", 2, created=NOW - 5)
    plan, y = reserve(nodes, bound, big + small)
    assert plan.taint == ["n0", "n1"] and plan.untaint == [] and plan.reserved == ["n0", "n1", "n2", "n3"]
    assert plan.tolerate == []
    # the small gang cannot use the reserved nodes: it does not fit now (it would have taken n2, n3)
    assert "ns/small" in y.blocked


def test_busy_nodes_are_reserved_oldest_work_first_and_only_as_many_as_needed():
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [dataclasses.replace(work(f"w{i}", f"n{i}"), created=NOW - t) for i, t in enumerate((30, 90, 10, 60))]
    plan, _ = reserve(nodes, bound, gang("big", 2, created=NOW - 400))
    assert plan.needed == 2 and plan.taint == ["n1", "n3"]


def test_reservations_go_once_the_gang_is_placed_or_gone():
    tok = rs.token("ns/big")
    nodes = [reserved_node("n0", tok), reserved_node("n1", tok), node("n2")]
    plan, _ = reserve(nodes, [], gang("other", 1, created=NOW - 5))
    assert plan.untaint == ["n0", "n1"] and plan.taint == []


def test_work_queued_by_kueue_is_left_to_kueue():
    nodes = [node(f"n{i}") for i in range(2)]
    bound = [work("x", "n0")]
    big = [dataclasses.replace(p, queued=True) for p in gang("big", 2, created=NOW - 1000)]
    plan, _ = reserve(nodes, bound, big)
    assert plan.unit == ""


def test_the_wait_that_counts_is_the_time_at_the_head_of_the_queue_not_since_creation():
    """A burst: every gang was created 400 s ago (past the 300 s threshold), but the queue moves: the head
    became the head 10 s ago, when the gang before it was placed. Nothing is reserved (a reservation for each
    gang in turn drained its nodes for up to a pod length and cost the 53-job burst a whole extra wave);
    once the same head has waited 300 s at the head it is."""
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work("w0", "n0"), work("w1", "n1"), work("w2", "n2")]  # n3 free
    pods = gang("a", 2, created=NOW - 400) + gang("b", 3, created=NOW - 400) + gang("c", 1, created=NOW - 399)
    plan, y = reserve(nodes, bound, pods, turn=("ns/a", NOW - 10))
    assert y.blocked == ["ns/a", "ns/b"] and y.fits == ["ns/c"]
    assert plan.unit == "" and plan.head == "ns/a" and plan.head_since == NOW - 10
    plan, _ = reserve(nodes, bound, pods, turn=("ns/a", NOW - 300))
    assert plan.unit == "ns/a" and plan.waited == 300 and plan.needed == 2


def test_a_new_head_starts_its_wait_when_it_becomes_the_head():
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work(f"w{i}", f"n{i}") for i in range(4)]
    pods = gang("b", 3, created=NOW - 900) + gang("c", 2, created=NOW - 800)
    # the last pass's head (ns/a) was placed since: ns/b is the head from now on, however old it is
    plan, _ = reserve(nodes, bound, pods, turn=("ns/a", NOW - 600))
    assert plan.head == "ns/b" and plan.head_since == NOW and plan.unit == ""
    # the head's wait carries over between passes
    plan, _ = reserve(nodes, bound, pods, turn=(plan.head, plan.head_since - 300))
    assert plan.unit == "ns/b" and plan.head_since == NOW - 300
    # only the head is reserved for its wait: a unit behind it is not, however long it has waited
    plan, _ = reserve(nodes, bound, pods, turn=("ns/b", NOW - 5))
    assert plan.unit == ""


def test_a_higher_priority_gang_is_the_head_and_kueues_work_never_is():
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work(f"w{i}", f"n{i}") for i in range(4)]
    low = gang("low", 2, created=NOW - 900)
    high = gang("high", 2, created=NOW - 5, prio=10)
    plan, _ = reserve(nodes, bound, low + high, turn=("ns/low", NOW - 600))
    assert plan.head == "ns/high" and plan.unit == ""  # the low one's turn ended when the high one came
    queued = [dataclasses.replace(p, queued=True) for p in gang("kq", 2, created=NOW - 900)]
    plan, _ = reserve(nodes, bound, queued + low, turn=("ns/low", NOW - 600))
    assert plan.head == "ns/low" and plan.unit == "ns/low"
    # nothing of the pool's waits: no head
    plan, _ = reserve(nodes, [], [], turn=("ns/low", NOW - 600))
    assert plan.head == "" and plan.unit == ""


# --- CPU pools: CPU work gets CPU balloons released as a unit, as GPU pools do -----------------------------

CPU_BALLOON = 86_400.0  # millicores: 0.9 of a 96-core node


def cpu_node(name: str) -> NodeView:
    return dataclasses.replace(node(name, gpus=0), labels={N.pool: "cpu"})


def cpu_pod(name: str, millis: int, gang: str = "", selector=((N.pool, "cpu"),), **kw) -> yd.WaitingPod:
    return dataclasses.replace(waiting(name, gang=gang, gpus=0, selector=selector, **kw), cpu_millis=millis)


def cpu_balloon(node_name: str) -> yd.Balloon:
    return yd.Balloon("fk", f"balloon-{node_name}", node_name, CPU_BALLOON, False)


def decide_cpu(nodes, bound, balloons, pods, budget=100):
    return yd.decide("cpu", nodes, bound, balloons, yd.units(pods, -1000, "cpu"), N, budget, "cpu")


def test_a_cpu_gang_gets_exactly_the_cpu_balloons_it_needs_in_one_release():
    nodes = [cpu_node(f"c{i}") for i in range(4)]
    pods = [cpu_pod(f"etl-{i}", 60_000, gang="etl") for i in range(3)]  # one per node
    out = decide_cpu(nodes, [], [cpu_balloon(n.name) for n in nodes], pods)
    assert [(r.unit, r.pods, r.amount, len(r.balloons)) for r in out.releases] == [("ns/etl", 3, 180_000, 3)]
    assert out.kept == 1 and out.hold and out.resource == "cpu" and out.fits == ["ns/etl"]


def test_small_cpu_work_that_fits_beside_a_balloon_releases_nothing():
    nodes = [cpu_node("c0")]
    out = decide_cpu(nodes, [], [cpu_balloon("c0")], [cpu_pod("small", 2_000)])
    assert out.releases == [] and out.fits == ["ns/pod/small"]


def test_gpu_and_cpu_work_only_ever_get_their_own_pools_balloons():
    gpu_nodes, cpu_nodes = [node("g0")], [cpu_node("c0")]
    gpu_work = [waiting("train", selector=())]  # 8 GPUs, no selector
    cpu_work = [cpu_pod("etl", 90_000)]
    assert yd.units(gpu_work + cpu_work, -1000, "gpu")[0].key == "ns/pod/train"
    assert [u.key for u in yd.units(gpu_work + cpu_work, -1000, "cpu")] == ["ns/pod/etl"]
    out = decide_cpu(cpu_nodes, [], [cpu_balloon("c0")], gpu_work + cpu_work)
    assert [r.unit for r in out.releases] == ["ns/pod/etl"]
    gpu = decide(gpu_nodes, [], [balloon("g0")], gpu_work + cpu_work)
    assert [r.unit for r in gpu.releases] == ["ns/pod/train"]


def test_cpu_work_that_does_not_name_the_pool_is_left_to_the_scheduler():
    nodes = [cpu_node("c0")]
    out = decide_cpu(nodes, [], [cpu_balloon("c0")], [cpu_pod("anywhere", 90_000, selector=())])
    assert out.releases == [] and not out.hold
    by_affinity = dataclasses.replace(cpu_pod("aff", 90_000, selector=()),
                                      affinity=(((N.pool, "In", ("cpu",)),),))
    assert [r.unit for r in decide_cpu(nodes, [], [cpu_balloon("c0")], [by_affinity]).releases] == ["ns/pod/aff"]


def test_cpu_already_taken_by_running_work_counts():
    nodes = [cpu_node("c0"), cpu_node("c1")]
    busy = dataclasses.replace(work("svc", "c0", gpus=0), cpu_millis=60_000)
    out = decide_cpu(nodes, [busy], [cpu_balloon("c1")], [cpu_pod("etl", 50_000)])
    assert [b.node for r in out.releases for b in r.balloons] == ["c1"]  # c0 has 36 cores left, not 50


def _place_by_scan(unit, nodes, room, held):
    """The placement rule written as a plain scan of every node for every pod (the reference)."""
    room = dict(room)
    released, where = set(), {}
    for pod in unit.pods:
        need = yd.amount(pod, unit.resource)
        best = None
        for n in nodes:
            if not yd.eligible(pod, n):
                continue
            b = held[n.name].amount if n.name in held and n.name not in released else 0.0
            if room[n.name] - b >= need:
                cand = (0, room[n.name] - b - need, n.name)
            elif b and room[n.name] >= need:
                cand = (1, room[n.name] - need, n.name)
            else:
                continue
            if best is None or cand < best:
                best = cand
        if best is None:
            return None
        if best[0] == 1:
            released.add(best[2])
        room[best[2]] -= need
        where[pod.name] = best[2]
    return where, released


def test_placement_matches_the_plain_scan_on_mixed_units():
    import random
    rnd = random.Random(3)
    for trial in range(300):
        nodes = [node(f"n{i:02d}", gpus=rnd.choice([4, 8, 8]),
                      taints=[("dedicated", "x", "NoSchedule")] if rnd.random() < 0.2 else ())
                 for i in range(rnd.randint(1, 14))]
        room = {n.name: float(rnd.choice([0, 2, 4, 8, n.gpus])) for n in nodes}
        room = {k: min(v, next(n.gpus for n in nodes if n.name == k)) for k, v in room.items()}
        held = {n.name: yd.Balloon("fk", f"b-{n.name}", n.name, float(rnd.choice([2, 4, 8])), False)
                for n in nodes if rnd.random() < 0.5}
        pods = []
        for i in range(rnd.randint(1, 10)):
            tol = [Toleration("dedicated", "Equal", "x", "NoSchedule")] if rnd.random() < 0.3 else []
            pin = (rnd.choice(nodes).name,) if rnd.random() < 0.1 else ()
            pods.append(waiting(f"p{i}", gang="g", gpus=rnd.choice([1, 2, 4, 8]), tolerations=tol, node_names=pin))
        unit = yd.Unit("ns/g", 0, NOW, tuple(sorted(pods, key=lambda p: (-p.gpus, p.name))))
        assert yd._place(unit, nodes, room, held) == _place_by_scan(unit, nodes, room, held), trial


def test_a_large_gang_checks_each_node_once_not_once_per_member(monkeypatch):
    calls = []
    real = yd.eligible
    monkeypatch.setattr(yd, "eligible", lambda p, n: calls.append(1) or real(p, n))
    nodes = [node(f"n{i:03d}") for i in range(300)]
    out = decide(nodes, [], [balloon(n.name) for n in nodes], gang("big", 200), budget=1000)
    assert out.releases and len(out.releases[0].balloons) == 200
    # one shape of member: every node checked once for the whole decision (was members x nodes per placement)
    assert len(calls) == len(nodes)


def test_a_gang_larger_than_the_burst_is_served_once_the_budget_is_full():
    nodes = [node(f"n{i:02d}") for i in range(12)]
    pods = gang("big", 10, created=NOW - 100) + gang("small", 1, created=NOW - 10)
    units = yd.units(pods, -1000)
    balloons = [balloon(n.name) for n in nodes]
    # budget not full (3 of at most 4): the big gang waits, and the younger unit does not overtake it
    out = yd.decide(POOL, nodes, [], balloons, units, N, 3, burst=4)
    assert out.releases == [] and out.over_budget == ["ns/big", "ns/small"]
    # full: the big gang gets its 10 balloons in one step and takes the whole budget; nothing is left for
    # the younger unit
    out = yd.decide(POOL, nodes, [], balloons, units, N, 4, burst=4)
    assert [(r.unit, len(r.balloons)) for r in out.releases] == [("ns/big", 10)]
    assert out.over_budget == ["ns/small"]
    # without a burst (the old call) a unit over the budget never goes
    assert yd.decide(POOL, nodes, [], balloons, units, N, 4).releases == []


# --- interchangeable balloons: no marks, the hold alone ----------------------------------------------


def test_balloons_on_alike_nodes_are_released_as_interchangeable():
    """Every node a balloon holds is alike and takes every pod: any of them would do, so the release
    names no particular balloon (the hold lets the ReplicaSet pick)."""
    nodes = [node(f"n{i}") for i in range(6)]
    out = decide(nodes, [], [balloon(n.name) for n in nodes], gang("train", 4) + [waiting("solo")])
    assert [r.interchangeable for r in out.releases] == [True, True]
    assert out.release_count == 5 and out.kept == 1


def test_balloons_are_marked_when_the_work_cannot_go_on_every_node_they_hold():
    nodes = [node(f"n{i}") for i in range(6)]
    out = decide(nodes, [], [balloon(n.name) for n in nodes], gang("pinned", 2, node_names=("n0", "n1", "n2")))
    assert [r.interchangeable for r in out.releases] == [False]  # only some of the nodes will do
    bound = [work("half", "n5", gpus=4)]  # n5 has less room than the others: not alike
    out = decide(nodes, bound, [balloon(n.name) for n in nodes[:5]] + [balloon("n5")], [waiting("solo", gpus=4)])
    assert out.releases and not out.releases[0].interchangeable


def test_balloons_a_held_deployment_is_still_removing_are_not_released_again():
    """An earlier pass released 4 interchangeable balloons and held the Deployment at 2; the ReplicaSet
    has not removed them yet. The same work still waits: it needs no new release, and the hold stays."""
    nodes = [node(f"n{i}") for i in range(6)]
    balloons = [balloon(n.name) for n in nodes]
    out = yd.decide(POOL, nodes, [], balloons, yd.units(gang("train", 4), -1000), N, 100, replicas=2)
    assert out.leaving == 4 and out.releases == [] and out.fits == ["ns/train"] and out.kept == 2
    # once they are gone (4 balloons left, replicas 2 already), nothing more leaves
    out = yd.decide(POOL, nodes, [], balloons[:2], yd.units(gang("train", 4), -1000), N, 100, replicas=2)
    assert out.leaving == 0 and out.releases == [] and out.kept == 2
    # a Deployment at the pool's size: nothing is leaving, the release is made
    out = yd.decide(POOL, nodes, [], balloons, yd.units(gang("train", 4), -1000), N, 100, replicas=6)
    assert out.leaving == 0 and out.release_count == 4 and out.kept == 2


def test_a_gang_still_missing_members_keeps_its_turn_for_room():
    """A gang of known size whose members are still being created (``expected``) is counted whole, oldest
    first: the balloons go for all of it, and a younger small gang does not take that room meanwhile."""
    nodes = [node(f"n{i}") for i in range(4)]
    balloons = [balloon(n.name) for n in nodes]
    big = [fresh(p) for p in gang("big", 2, created=NOW - 10)]  # 2 of its 4 members exist so far
    small = [fresh(p) for p in gang("small", 2, created=NOW - 5)]  # complete, younger
    complete = {"ns/small"}.__contains__
    # without the expectation the small gang comes first: it is the only complete one
    assert [u.key for u in yd.units(big + small, -1000, complete=complete)] == ["ns/small"]
    units = yd.units(big + small, -1000, complete=complete, expected=lambda k: 4 if k == "ns/big" else 0)
    assert [(u.key, len(u.pods)) for u in units] == [("ns/big", 4), ("ns/small", 2)]
    assert sum(p.placeholder for p in units[0].pods) == 2 and not any(p.placeholder for p in units[1].pods)
    out = yd.decide(POOL, nodes, [], balloons, units, N, 100)
    assert [(r.unit, len(r.balloons)) for r in out.releases] == [("ns/big", 4)]
    assert out.fits == ["ns/big"] and out.blocked == ["ns/small"]


def test_a_gang_whose_size_is_not_known_yet_keeps_its_turn():
    """Before the gang controller's first pass over a gang (its size unknown: ``expected`` answers None),
    the gang keeps its place in line: no younger gang is let go before it is sized (it may need all the
    room), while room that is free already still goes to a pod of its own (kube-scheduler places it
    wherever room is free: fleetkeeper holds gangs only)."""
    nodes = [node(f"n{i}") for i in range(4)]
    balloons = [balloon(n.name) for n in nodes[:3]]  # n3 is free
    big = [fresh(p) for p in gang("big", 2, created=NOW - 10)]  # first members of a gang being created
    small = [fresh(p) for p in gang("small", 2, created=NOW - 5)]
    solo = [fresh(waiting("solo", created=NOW - 4))]
    complete = {"ns/small"}.__contains__
    units = yd.units(big + small + solo, -1000, complete=complete,
                     expected=lambda k: None if k == "ns/big" else 0)
    assert [(u.key, u.sizing) for u in units] == [("ns/big", True), ("ns/small", False), ("ns/pod/solo", False)]
    out = yd.decide(POOL, nodes, [], balloons, units, N, 100)
    assert out.releases == [] and out.sizing == ["ns/big"]
    assert out.behind == ["ns/small"] and out.fits == ["ns/pod/solo"]  # the free node, no release
    assert room_verdicts([out])["ns/small"] == "blocked"  # held
    # once sized (4 members), it is served first and whole
    units = yd.units(big + small, -1000, complete=complete, expected=lambda k: 4 if k == "ns/big" else 0)
    out = yd.decide(POOL, nodes, [], balloons, units, N, 100)
    assert [r.unit for r in out.releases] == ["ns/big"] and out.sizing == []


def test_a_reservation_is_never_for_a_gang_still_missing_members():
    from fleetkeeper.capacity import reserve as rs
    nodes = [node(f"n{i}") for i in range(2)]
    (u,) = yd.units([fresh(p) for p in gang("big", 1, created=NOW - 600)], -1000, expected=lambda k: 2)
    plan = rs.decide(POOL, nodes, [work("w0", "n0"), work("w1", "n1")], [u], ["ns/big"], N, NOW, 60.0)
    assert plan.unit == "" and plan.taint == [] and plan.tolerate == []


def test_balloons_released_earlier_and_not_yet_deleting_are_going():
    """What the controller evicts if they linger: marked ones not yet being deleted, and those an
    interchangeable release left to the ReplicaSet (the leaving ones); never one already being deleted."""
    nodes = [node(f"n{i}") for i in range(4)]
    marked = dataclasses.replace(balloon("n0"), released=True)
    deleting = dataclasses.replace(balloon("n1"), released=True, deleting=True)
    out = yd.decide(POOL, nodes, [], [marked, deleting, balloon("n2"), balloon("n3")],
                    yd.units([waiting("solo")], -1000), N, 100)
    assert [b.name for b in out.going] == ["balloon-n0"]
    # the Deployment is held at 1 but 2 unmarked balloons still run: one of them is leaving
    out = yd.decide(POOL, nodes, [], [balloon("n2"), balloon("n3")], yd.units([waiting("solo")], -1000), N, 100,
                    replicas=1)
    assert out.leaving == 1 and [b.name for b in out.going] == ["balloon-n3"]


def test_a_complete_gang_counts_whole_even_where_the_passs_view_lags():
    """The gang controller knows all 4 members; the pass's own view has seen 3 so far. Counted with 3, the
    gang would leave a node to a younger gang that its own cycle then lacks."""
    nodes = [node(f"n{i}") for i in range(4)]
    big = [fresh(p) for p in gang("big", 3, created=NOW - 10)]
    small = [fresh(p) for p in gang("small", 1, created=NOW - 5)]
    complete = {"ns/big", "ns/small"}.__contains__
    lagging = yd.decide(POOL, nodes, [], [], yd.units(big + small, -1000, complete=complete), N, 100)
    assert lagging.fits == ["ns/big", "ns/small"]  # what went wrong before
    units = yd.units(big + small, -1000, complete=complete, expected=lambda k: 4 if k == "ns/big" else 0)
    out = yd.decide(POOL, nodes, [], [], units, N, 100)
    assert out.fits == ["ns/big"] and out.blocked == ["ns/small"]


def test_a_held_gang_counts_where_the_gang_controllers_view_lags():
    """All 4 members of the older gang are in the pass's view, but the gang controller has seen only 2 so
    far (its own informer is behind): it does not call the gang complete yet. The gang carries fleetkeeper's
    gate (held for this pass's verdict), so it still counts, first: the younger gang is blocked, not let
    go onto the older one's room."""
    nodes = [node(f"n{i}") for i in range(4)]
    older = [fresh(p, held=True) for p in gang("older", 4, created=NOW - 10)]
    younger = [fresh(p, held=True) for p in gang("younger", 2, created=NOW - 5)]
    complete = {"ns/younger"}.__contains__
    units = yd.units(older + younger, -1000, complete=complete, expected=lambda k: 4 if k == "ns/older" else 2)
    assert [(u.key, len(u.pods)) for u in units] == [("ns/older", 4), ("ns/younger", 2)]
    out = yd.decide(POOL, nodes, [], [], units, N, 100)
    assert out.fits == ["ns/older"] and out.blocked == ["ns/younger"]
    # members not held by fleetkeeper and not complete stay out (the scheduler holds them before its queue)
    assert [u.key for u in yd.units([fresh(p, held=False) for p in older] + younger, -1000, complete=complete,
                                    expected=lambda k: 4 if k == "ns/older" else 2)] == ["ns/younger"]
    # the projector reads the gate
    proj = yd.waiting_pod_projector(N)
    pod = {"metadata": {"namespace": "ns", "name": "p"},
           "spec": {"schedulingGates": [{"name": N.gang_gate}]}, "status": {"phase": "Pending"}}
    assert proj(pod).held and not proj(pod).gated


def test_the_slot_count_agrees_with_placing_the_unit():
    """Slots.fits (the shortcut before a placement) never says "cannot fit" for a unit the placement fits,
    and for a unit of one kind it says exactly what the placement says."""
    import random

    rng = random.Random(7)
    for trial in range(300):
        nodes = [node(f"n{i}", gpus=rng.choice([4, 8]), taints=[("t", "x", "NoSchedule")] if rng.random() < 0.2
                      else ()) for i in range(rng.randint(1, 8))]
        room = {n.name: float(n.gpus - rng.choice([0, 0, 1, 2, 4])) for n in nodes}
        held = {n.name: balloon(n.name) for n in nodes if rng.random() < 0.5}
        kinds = [dict(gpus=rng.choice([1, 2, 3, 4, 8])) for _ in range(rng.choice([1, 1, 2]))]
        kinds = [dict(k, tolerations=[yd.Toleration("t", "Equal", "x", "NoSchedule")] if rng.random() < 0.5 else [])
                 for k in kinds]
        pods = [waiting(f"p{trial}-{i}", gang="g", **rng.choice(kinds)) for i in range(rng.randint(1, 10))]
        (u,) = yd.units(pods, -1000)
        elig = yd.Eligibility(nodes)
        placed = yd._place(u, nodes, room, held, elig)
        said = yd.Slots(elig, room).fits(u)
        assert not (said is False and placed is not None), (trial, u, room)
        if len({(yd._shape(p), p.gpus) for p in u.pods}) == 1:
            assert said == (placed is not None), (trial, u, room)


def test_units_blocked_behind_a_full_pool_are_judged_without_placing_each():
    """300 small gangs behind a 1,000-pod job that holds every node: each is judged blocked by the count."""
    nodes = [node(f"n{i:04d}") for i in range(1000)]
    bound = [work(f"big-{i}", n.name) for i, n in enumerate(nodes)]
    pods = [p for g in range(300) for p in gang(f"g{g}", 1 + g % 8)]
    calls = []
    real = yd._place

    def counting(*a, **kw):
        calls.append(a[0].key)
        return real(*a, **kw)
    yd._place, saved = counting, yd._place
    try:
        out = decide(nodes, bound, [], pods)
    finally:
        yd._place = saved
    assert len(out.blocked) == 300 and not out.fits and out.hold
    assert calls == []


# --- room released for a gang stays its own (claims) ------------------------------------------------------

def test_room_released_for_a_gang_and_taken_in_part_is_reserved_for_it_at_once():
    """Balloons were released for the big gang (it needs every node); before it was placed, another job's pod
    was bound onto one of the freed nodes. The gang is blocked now; without its claim backfill hands the
    three free nodes to the younger gang and the big one waits for its threshold. With the claim its room is
    reserved at once, whatever its wait: the younger gang is held, the stray pod runs on."""
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work("stray", "n2")]
    pods = gang("big", 4, created=NOW - 20) + gang("small", 2, created=NOW - 10)
    units = yd.units(pods, -1000)
    y, plan = rs.settle(POOL, nodes, bound, [], units, N, 100, NOW, 300.0)
    assert plan.unit == "" and "ns/small" in y.free  # unclaimed: backfill, as before
    y, plan = rs.settle(POOL, nodes, bound, [], units, N, 100, NOW, 300.0, claimed=frozenset({"ns/big"}))
    assert plan.unit == "ns/big" and plan.claimed and not plan.virtual
    assert plan.taint == ["n0", "n1", "n3", "n2"] and plan.tolerate == [f"ns/big-{i}" for i in range(4)]
    assert y.blocked == ["ns/big", "ns/small"] and y.fits == [] and y.free == []
    # a claim on a unit that is not blocked reserves nothing
    y, plan = rs.settle(POOL, nodes, [], [], units, N, 100, NOW, 300.0, claimed=frozenset({"ns/big"}))
    assert plan.unit == "" and y.fits == ["ns/big"]


def test_a_claimed_gang_still_missing_members_keeps_its_room_in_the_simulation_only():
    """Its members are still being created (placeholders): nothing is written (a member created later would
    lack the toleration), but younger work is not judged to fit on its room; with reservations off
    (``after`` None) the claim still holds that way."""
    nodes = [node(f"n{i}") for i in range(4)]
    bound = [work("stray", "n2")]
    big = gang("big", 3, created=NOW - 20)
    units = yd.units(big + gang("small", 2, created=NOW - 10), -1000, expected=lambda k: 4 if k == "ns/big" else 0)
    assert sum(p.placeholder for p in units[0].pods) == 1
    for after in (300.0, None):
        y, plan = rs.settle(POOL, nodes, bound, [], units, N, 100, NOW, after, claimed=frozenset({"ns/big"}))
        assert plan.unit == "ns/big" and plan.virtual and plan.taint == [] and plan.tolerate == []
        assert len(plan.reserved) == 4 and "ns/small" in y.blocked and y.fits == []
    # past its threshold, still missing members: not reserved for its wait (unclaimed), as before
    y, plan = rs.settle(POOL, nodes, bound, [], units, N, 100, NOW, 5.0)
    assert plan.unit == "" and "ns/small" in y.free


def test_a_gang_being_sized_keeps_its_turn_on_free_room_too():
    """No balloons in the pool (gangs without balloons): every node is free. Before the older gang is sized,
    a younger complete gang that fits the free room waits behind it rather than being let go: let go, it
    took part of the pool, the older gang (which needs all of it) was then blocked, and every younger gang
    took the room it freed until the older one's reservation (a 1,000-pod job started last of 300)."""
    nodes = [node(f"n{i}") for i in range(4)]
    big = [fresh(p) for p in gang("big", 1, created=NOW - 10)]  # the first member of a large Job
    small = [fresh(p) for p in gang("small", 2, created=NOW - 5)]
    complete = {"ns/small"}.__contains__
    units = yd.units(big + small, -1000, complete=complete, expected=lambda k: None if k == "ns/big" else 0)
    out = yd.decide(POOL, nodes, [], [], units, N, 100)
    assert out.sizing == ["ns/big"] and out.behind == ["ns/small"] and out.fits == [] and out.free == []
    assert room_verdicts([out]) == {"ns/big": "blocked", "ns/small": "blocked"}
    # sized at 4 members (3 not created yet): it takes the whole pool in its turn, the small gang waits
    units = yd.units(big + small, -1000, complete=complete, expected=lambda k: 4 if k == "ns/big" else 0)
    out = yd.decide(POOL, nodes, [], [], units, N, 100)
    assert out.fits == ["ns/big"] and out.blocked == ["ns/small"] and out.behind == []
