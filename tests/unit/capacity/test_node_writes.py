"""The capacity component writes nodes only through the core applier (the reservation taint), and loads
its ConfigMap through the core loader (missing: defaults; no key or invalid: an error naming it)."""

from __future__ import annotations

import copy

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import BalloonManager, load_cluster_config
from fleetkeeper.capacity.metrics import CapacityMetrics
from fleetkeeper.capacity.reserve import reserved_key
from fleetkeeper.core import errors
from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings

NAMES = Names()
W = "fleetkeeper_node_writes_total"


class FakeKube:
    metrics = None

    def __init__(self, cm=None):
        self.cm = cm
        self.patches: list[tuple[str, dict]] = []
        self.events: list[dict] = []
        self.conflict = False

    async def patch(self, res, name, body, namespace=None, **kw):
        assert res == NODES
        if self.conflict:
            raise errors.Conflict(409, "Conflict", "the object has been modified")
        self.patches.append((name, copy.deepcopy(body)))
        return body

    async def create(self, res, body, namespace=None, **kw):
        self.events.append(body)
        return body

    async def get_or_none(self, res, name, namespace=None):
        return self.cm

    async def list(self, res, namespace=None, **kw):
        return [], "1"


def raw_node(name="n1", rv="5"):
    return {"metadata": {"name": name, "uid": name, "resourceVersion": rv, "labels": {NAMES.pool: "gpu"}},
            "spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def balloons(dry_run=False):
    kube = FakeKube()
    mgr = Manager(kube, RuntimeSettings(namespace="fk", dry_run=dry_run, server={"port": 0},
                                        leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=FakeClock())
    bm = BalloonManager(mgr, CapacityConfig(), CapacityMetrics(mgr.registry), mgr.recorder("capacity"))
    bm.nodes._apply("ADDED", raw_node())
    return kube, mgr, bm


async def test_the_reservation_taint_is_one_applier_patch_on_the_cached_node():
    kube, mgr, bm = balloons()
    assert await bm._set_taint("n1", reserved_key(NAMES), "tok", "reserved for gang ns/g") == "ok"
    [(name, body)] = kube.patches
    assert name == "n1" and body["metadata"] == {"resourceVersion": "5"}  # the cache's, no GET
    assert body["spec"]["taints"] == [{"key": "other", "effect": "NoSchedule"},
                                      {"key": reserved_key(NAMES), "value": "tok", "effect": "NoSchedule"}]
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "reserve", "result": "success"}) == 1
    assert await mgr.flush_events(10)  # Events are written off the write path
    assert [e["reason"] for e in kube.events] == ["NodeReserved"]


async def test_a_conflict_is_left_for_the_next_pass_and_counted():
    kube, mgr, bm = balloons()
    kube.conflict = True
    # nothing to remove on the cached node: already true, no write is even tried
    assert await bm._set_taint("n1", reserved_key(NAMES), None, "removed") == "ok"
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "unreserve",
                                             "result": "conflict"}) is None
    assert await bm._set_taint("n1", reserved_key(NAMES), "tok", "reserved") == "error"
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "reserve", "result": "conflict"}) == 1
    assert kube.patches == [] and await bm._set_taint("gone", reserved_key(NAMES), "tok", "x") == "error"


async def test_dry_run_writes_nothing_and_counts_it():
    kube, mgr, bm = balloons(dry_run=True)
    assert await bm._set_taint("n1", reserved_key(NAMES), "tok", "reserved") == "dry_run"
    assert await mgr.flush_events(10)
    assert kube.patches == [] and kube.events == []
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "reserve", "result": "dry_run"}) == 1


def test_the_pass_interval_follows_the_pass_cost_within_its_bounds():
    from fleetkeeper.capacity.controller import pass_interval
    assert pass_interval(0.0) == 0.2  # a cheap pass: the next may come 0.2 s later
    assert pass_interval(0.05) == pytest.approx(0.5)  # 10x its cost: passes take at most a tenth of the loop
    assert pass_interval(0.2) == 1.0 and pass_interval(30.0) == 1.0  # never further apart than a second


async def test_events_within_the_interval_wait_for_it_and_a_costly_pass_widens_it(monkeypatch):
    from fleetkeeper.capacity import balloons as bl
    kube, mgr, bm = balloons(dry_run=True)
    decide = bl.decide

    def slow_decide(*a, **kw):  # the pass costs 0.06 s of the (fake) monotonic clock
        mgr.clock._mono += 0.06
        return decide(*a, **kw)
    first = await bm.reconcile("pools")
    assert first.requeue_after and first.requeue_after > 1  # nothing waits: the resync, not the interval
    await mgr.clock.advance(0.05)
    assert (await bm.reconcile("pools")).requeue_after == pytest.approx(0.15)  # 0.2 s after the last pass
    await mgr.clock.advance(0.15)
    monkeypatch.setattr(bl, "decide", slow_decide)
    assert (await bm.reconcile("pools")).requeue_after > 1  # a pass ran, it took 0.06 s
    assert (await bm.reconcile("pools")).requeue_after == pytest.approx(0.6 - 0.06)  # 10x 0.06 s from its start
    assert mgr.registry.get_sample_value("fleetkeeper_balloon_pass_seconds_count") == 2


async def test_configmap_missing_is_the_defaults():
    cfg = await load_cluster_config(FakeKube(None), "fk")
    assert cfg == CapacityConfig()


@pytest.mark.parametrize("cm,words", [
    ({"data": {"other.yaml": "x"}}, "missing key 'config.yaml'"),
    ({"data": {"config.yaml": "balloons: {priority: 0}"}}, "balloons.priority"),
    ({"data": {"config.yaml": "balloons: ["}}, "not valid YAML"),
])
async def test_configmap_without_its_key_or_invalid_is_an_error_naming_it(cm, words):
    with pytest.raises(errors.ConfigError) as exc:
        await load_cluster_config(FakeKube(cm), "fk")
    assert words in str(exc.value) and "fk/fleetkeeper-capacity" in str(exc.value)


# --- a reservation is one step: every node its gang needs, at once, for one token of the budget ----------


class PodPatchingKube(FakeKube):
    def __init__(self):
        super().__init__()
        self.pod_patches: list[str] = []

    async def patch(self, res, name, body, namespace=None, **kw):
        if res == NODES:
            return await super().patch(res, name, body, namespace, **kw)
        self.pod_patches.append(name)
        return body


def gpu_node(name: str) -> dict:
    return {"metadata": {"name": name, "uid": name, "resourceVersion": "1", "labels": {NAMES.pool: "gpu"}},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}],
                                   "allocatable": {"nvidia.com/gpu": "8", "cpu": "96"}}}


def starving(n_nodes: int, per_minute: float):
    from test_yielding import gang  # the same waiting pods the decision tests use

    from fleetkeeper.capacity import yielding as yd
    kube = PodPatchingKube()
    clock = FakeClock()
    mgr = Manager(kube, RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=clock)
    cfg = CapacityConfig.model_validate({"gangs": {"reserve_after_seconds": 60, "reserve_per_minute": per_minute}})
    bm = BalloonManager(mgr, cfg, CapacityMetrics(mgr.registry), mgr.recorder("capacity"))
    for i in range(n_nodes):
        bm.nodes._apply("ADDED", gpu_node(f"n{i}"))
    nodes = bm.nodes.items()
    # every node busy with work that started before the gang: it fits the pool, not now
    from test_yielding import work
    bound = [work(f"w{i}", f"n{i}") for i in range(n_nodes)]
    units = yd.units(gang("big", n_nodes, created=clock.now() - 120), -1000)
    y = yd.decide("gpu", nodes, bound, [], units, NAMES, 0)
    assert y.blocked == ["ns/big"]
    bm._pool_nodes, bm._pool_bound, bm._units = {"gpu": nodes}, {"gpu": bound}, units
    return kube, mgr, bm, y


async def reserve_room(bm, y):
    """The pass's reservation step as ``_yields`` leaves it (the plan decided with the yield), then applied."""
    from fleetkeeper.capacity import reserve as rs
    bm._reserve_plans["gpu"] = rs.decide("gpu", bm._pool_nodes["gpu"], bm._pool_bound.get("gpu", []), bm._units,
                                         y.blocked, NAMES, bm.clock.now(), bm.reserve_after,
                                         turn=("ns/big", bm.clock.now() - 120))  # the head for 120 s
    await bm._reserve_room([y])


async def test_a_reservation_taints_every_node_its_gang_needs_in_one_step_within_the_budget():
    # one reservation step a minute: the gang's 200 nodes are still reserved at once (before: 1 a pass)
    kube, mgr, bm, y = starving(200, per_minute=1)
    await reserve_room(bm, y)
    assert sorted(name for name, _ in kube.patches) == sorted(f"n{i}" for i in range(200))
    assert len(kube.pod_patches) == 200  # every member tolerates exactly that reservation
    assert bm.last_reserve["gpu"].reserved == sorted(f"n{i}" for i in range(200))
    assert mgr.registry.get_sample_value("fleetkeeper_node_reservations_total",
                                         {"op": "reserve", "result": "ok"}) == 200
    # an Event on the first nodes of the step and one on the gang naming the step; not 200 node Events
    reasons = [reason for _, _, reason, _ in bm.recorder.emitted]
    assert reasons.count("NodeReserved") == 20 and reasons.count("GangRoomReserved") == 1


async def test_a_second_reservation_step_in_the_same_minute_waits_for_the_budget():
    kube, mgr, bm, y = starving(4, per_minute=1)
    await reserve_room(bm, y)
    assert len(kube.patches) == 4
    tok = bm.last_reserve["gpu"].token
    for i in range(4):  # the informer sees the taints
        body = gpu_node(f"n{i}")
        body["metadata"]["resourceVersion"] = "2"
        body["spec"]["taints"] = [{"key": reserved_key(NAMES), "value": tok, "effect": "NoSchedule"}]
        bm.nodes._apply("MODIFIED", body)
    bm._pool_nodes = {"gpu": bm.nodes.items()}
    # the gang was placed (gone from the waiting work): removing its reservation is the next step, and the
    # budget (one step a minute) is spent
    bm._units = []
    kube.patches.clear()
    await reserve_room(bm, y)
    assert kube.patches == [] and bm.last_reserve["gpu"].untaint == ["n0", "n1", "n2", "n3"]
    assert mgr.registry.get_sample_value("fleetkeeper_node_reservations_total",
                                         {"op": "release", "result": "rate_limited"}) == 4
    await mgr.clock.advance(60)  # a minute later: the whole removal in one step
    await reserve_room(bm, y)
    assert sorted(name for name, _ in kube.patches) == ["n0", "n1", "n2", "n3"]


# --- room that frees while work waits brings the next pass at once, not at the hold's resync ---------------


def pod_body(name: str, node_name: str, phase: str, rv: str, labels=None) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": rv,
                         "labels": dict(labels or {}), "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": node_name, "containers": [{"name": "c"}]}, "status": {"phase": phase}}


async def test_a_bound_pod_ending_brings_a_pass_only_while_work_waits_for_room():
    kube = FakeKube()
    mgr = Manager(kube, RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=FakeClock())
    bm = BalloonManager(mgr, CapacityConfig(), CapacityMetrics(mgr.registry), mgr.recorder("capacity"))
    q = bm.controller.queue

    def drain():
        n = len(q)
        q._queue.clear()
        q._queued.clear()
        return n

    bm.pods._apply("ADDED", pod_body("a", "n1", "Running", "1"))
    bm.pods._apply("ADDED", pod_body("b", "n2", "Running", "1"))
    drain()
    bm.pods._apply("MODIFIED", pod_body("a", "n1", "Succeeded", "2"))
    assert drain() == 0  # nothing waits: a pod ending is not the balloon pass's business
    bm._room_wanted = True  # the last pass held room for waiting work
    bm.pods._apply("MODIFIED", pod_body("b", "n2", "Succeeded", "2"))
    assert drain() == 1
    bm.pods._apply("MODIFIED", pod_body("b", "n2", "Succeeded", "3"))  # already ended: no new room
    assert drain() == 0
    bm.pods._apply("ADDED", pod_body("c", "n3", "Running", "1"))
    assert drain() == 0
    bm.pods._apply("DELETED", pod_body("c", "n3", "Running", "1"))  # a running pod deleted: room frees
    assert drain() == 1


def gang_pod(i: int) -> dict:
    return {"metadata": {"name": f"train-{i}", "namespace": "ns", "uid": f"u{i}", "resourceVersion": str(i + 1),
                         "labels": {NAMES.gang: "train"}, "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {}, "status": {"phase": "Pending"}}


async def test_a_large_gangs_pod_events_are_coalesced_into_one_pass_per_interval():
    """A pass over a gang reads every member: a large gang's thousands of member events within
    COALESCE_SECONDS make one pass, a small gang's each make one at once."""
    from fleetkeeper.capacity import controller as cc

    clock = FakeClock()
    mgr = Manager(FakeKube(), RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=clock)
    gm = cc.GangManager(mgr, CapacityConfig(), CapacityMetrics(mgr.registry), mgr.recorder("capacity"))
    q = gm.controller.queue
    gm.pods._apply("ADDED", gang_pod(0))
    assert len(q) == 1 and not q._delayed  # a small gang: at once
    await q.get()  # a worker takes it (the pass is running)
    q.done("ns/train")
    gm._soon.discard("ns/train")
    for i in range(1, 400):
        gm.pods._apply("ADDED", gang_pod(i))
    for i in range(400):
        pod = gang_pod(i)
        pod["status"]["phase"] = "Running"
        pod["metadata"]["resourceVersion"] = str(1000 + i)
        gm.pods._apply("MODIFIED", pod)
    # the first COALESCE_MEMBERS - 1 additions came one by one (deduplicated in the queue), the rest wait
    assert len(q) == 1 and len(q._delayed) == 1, (len(q), len(q._delayed))
    await q.get()
    q.done("ns/train")
    await clock.advance(cc.COALESCE_SECONDS)
    assert q._promote_due() is None and len(q) == 1  # one pass for the 750 events that came after


def test_a_gang_not_yet_looked_at_has_no_known_size_for_a_short_while():
    """``expected`` answers None (size unknown: the pools' pass keeps its turn) for a gang with young
    members and no pass of the gang controller yet; 0 once the members are older than the window."""
    from fleetkeeper.capacity import controller as cc
    from fleetkeeper.core.views import parse_time

    created = parse_time(gang_pod(0)["metadata"]["creationTimestamp"])
    clock = FakeClock(start=created + 1)
    mgr = Manager(FakeKube(), RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=clock)
    gm = cc.GangManager(mgr, CapacityConfig(), CapacityMetrics(mgr.registry), mgr.recorder("capacity"))
    gm.pods._apply("ADDED", gang_pod(0))
    assert gm.expected("ns/train") is None
    clock._now = created + CapacityConfig().gangs.expect_members_seconds + 1
    assert gm.expected("ns/train") == 0
    off = CapacityConfig.model_validate({"gangs": {"expect_members_seconds": None}})
    gm2 = cc.GangManager(mgr, off, CapacityMetrics(CollectorRegistry()), mgr.recorder("capacity"))
    clock._now = created + 1
    gm.pods._apply("ADDED", gang_pod(1))  # seen by both
    assert gm2.members["ns/train"] and gm2.expected("ns/train") == 0 and gm.expected("ns/train") is None


async def test_a_group_object_just_created_is_not_created_again_before_the_cache_shows_it():
    from fleetkeeper.capacity import controller as cc
    from fleetkeeper.capacity import gangs as gg
    from fleetkeeper.core.kube import PODGROUPS, WORKLOADS

    clock = FakeClock()
    mgr = Manager(FakeKube(), RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=clock)
    gm = cc.GangManager(mgr, CapacityConfig(), CapacityMetrics(mgr.registry), mgr.recorder("capacity"))

    def plan():
        p = gg.GangPlan("ns/train")
        p.create = [(WORKLOADS, {}), (PODGROUPS, {})]
        return p
    gm._made[("ns/train", WORKLOADS.plural)] = clock.monotonic()
    assert [r for r, _ in gm._unmade(plan()).create] == [PODGROUPS]
    await clock.advance(cc.MADE_GRACE_SECONDS)
    assert [r for r, _ in gm._unmade(plan()).create] == [WORKLOADS, PODGROUPS]  # never shown: made again


# --- gangs turned off: the gangs admitted before are still repaired --------------------------------------


def unschedulable_member(i: int, since: str) -> dict:
    return {"metadata": {"name": f"train-{i}", "namespace": "ns", "uid": f"u{i}", "resourceVersion": str(i + 1),
                         "labels": {NAMES.gang: "train"}, "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {"schedulingGroup": {"podGroupName": "train"}, "priority": 0,
                     "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "waiting for minCount pods", "lastTransitionTime": since}]}}


@pytest.mark.parametrize("finish_gangs", [True, False])
async def test_with_gangs_off_a_gang_in_flight_found_no_room_is_retried_once_room_frees(finish_gangs):
    """Gangs off, balloons off, a gang admitted before still in flight (setup's ``finish_gangs``): it was
    handed to kube-scheduler while its room was taken and found unschedulable; the room frees. The pass
    retries it with one requeue pod (kube-scheduler may otherwise never try the group again, the v1.36 gang
    stall). Without ``finish_gangs`` (a cluster that never had gangs) the pass watches no waiting pods."""
    kube = FakeKube()
    clock = FakeClock(1_796_083_200.0 + 3600)  # an hour after the members were last tried
    mgr = Manager(kube, RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=clock)
    cfg = CapacityConfig.model_validate({"balloons": {"enabled": False,
                                                      "pools": [{"name": "gpu", "resource": "gpu"}]},
                                         "gangs": {"enabled": False}})
    bm = BalloonManager(mgr, cfg, CapacityMetrics(mgr.registry), mgr.recorder("capacity"),
                        finish_gangs=finish_gangs)
    if not finish_gangs:
        assert bm.waiting is None and bm.requeue_after is None
        return
    bm.gang_complete = lambda key: key == "ns/train"  # its PodGroup and members exist: handed over
    for i in range(3):
        bm.nodes._apply("ADDED", gpu_node(f"n{i}"))
        bm.waiting._apply("ADDED", unschedulable_member(i, "2026-12-01T00:00:00Z"))
    stray = pod_body("stray", "n0", "Running", "1")
    stray["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "8"}}
    bm.pods._apply("ADDED", stray)
    await bm._pass()  # other work holds part of its room
    assert bm.last_yield["gpu"].fits == [] and bm.last_requeue.kick == []
    assert bm._room_wanted  # a gang kube-scheduler has waits: room freeing brings the next pass
    q = bm.controller.queue
    q._queue.clear()
    q._queued.clear()
    bm.pods._apply("DELETED", stray)
    assert len(q) == 1
    await bm._pass()  # the room is free: the retry falls due shortly after
    assert bm.last_yield["gpu"].fits == ["ns/train"]
    assert not [b for b in kube.events if b.get("kind") == "Pod"]
    await clock.advance(cfg.gangs.retry_when_room_frees_after_seconds + 1)
    await bm._pass()
    [probe] = [b for b in kube.events if b.get("kind") == "Pod"]
    assert probe["spec"]["schedulingGroup"] == {"podGroupName": "train"}
    assert mgr.registry.get_sample_value("fleetkeeper_gang_requeue_pods_total", {"op": "kick", "result": "ok"}) == 1


async def test_the_pass_keeps_the_heads_wait_between_passes_and_reserves_once_it_reaches_the_threshold():
    """The head's wait is the time since it became the pool's head, carried from pass to pass by the
    controller (reserve.decide's ``turn``): the members were created an hour ago, yet nothing is reserved
    until the gang has been the head for ``reserve_after_seconds``; a restart starts the wait again."""
    kube = PodPatchingKube()
    clock = FakeClock(1_796_083_200.0 + 3600)  # an hour after the members were created
    cfg = CapacityConfig.model_validate({"balloons": {"enabled": False,
                                                      "pools": [{"name": "gpu", "resource": "gpu"}]},
                                         "gangs": {"reserve_after_seconds": 60}})

    def manager() -> BalloonManager:  # a fresh process: its own registry, the same cluster and clock
        mgr = Manager(kube, RuntimeSettings(namespace="fk", server={"port": 0}, leader_election={"enabled": False}),
                      registry=CollectorRegistry(), clock=clock)
        bm = BalloonManager(mgr, cfg, CapacityMetrics(mgr.registry), mgr.recorder("capacity"))
        bm.gang_complete = lambda key: key == "ns/train"
        for i in range(3):
            bm.nodes._apply("ADDED", gpu_node(f"n{i}"))
            bm.waiting._apply("ADDED", unschedulable_member(i, "2026-12-01T00:00:00Z"))
        busy = pod_body("busy", "n0", "Running", "1")
        busy["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "8"}}
        bm.pods._apply("ADDED", busy)
        return bm

    bm = manager()
    start = clock.now()
    await bm._pass()
    plan = bm.last_reserve["gpu"]
    assert bm.last_yield["gpu"].blocked == ["ns/train"]
    assert (plan.head, plan.head_since, plan.unit) == ("ns/train", start, "")
    await clock.advance(59)
    await bm._pass()
    assert bm.last_reserve["gpu"].unit == "" and bm.last_reserve["gpu"].head_since == start
    assert bm.metrics.head_wait.labels("gpu")._value.get() == 59
    await clock.advance(1)
    await bm._pass()
    plan = bm.last_reserve["gpu"]
    assert plan.unit == "ns/train" and plan.waited == 60 and plan.needed == 3
    assert sorted(name for name, _ in kube.patches) == ["n0", "n1", "n2"]  # the reservation was written
    # a restart: the wait starts again (the taints written before would carry a reservation on)
    bm = manager()
    await bm._pass()
    assert bm.last_reserve["gpu"].unit == "" and bm.last_reserve["gpu"].head_since == clock.now()
