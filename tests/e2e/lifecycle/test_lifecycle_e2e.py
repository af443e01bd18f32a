"""The node lifecycle, the shared disruption budget and gang-aware drains on the
real local control plane, on this test's own KWOK nodes (prefix "lc")."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core import events as events_mod
from fleetkeeper.core.events import EventRecorder, node_ref
from fleetkeeper.core.faults import FaultPlan, parse_fault
from fleetkeeper.core.kube import EVENTS, NODES, PDBS, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.controller import HealthOptions
from fleetkeeper.health.controller import setup as health_setup
from fleetkeeper.health.policy import load_policy
from fleetkeeper.lifecycle import budget as bud
from fleetkeeper.lifecycle.config import load_lifecycle
from fleetkeeper.lifecycle.controller import LifecycleOptions
from fleetkeeper.lifecycle.controller import setup as lifecycle_setup
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.controller import Preflight
from e2e_helpers import create_nodes, events_for, stop, taint, wait_for

GROUP = "fleetkeeper.io/e2e-group"
N = Names()
Q = "fleetkeeper.io/quarantine"


@pytest.fixture
async def own_nodes(kube):
    made: list[str] = []
    group = secrets.token_hex(3)

    async def make(n: int) -> list[str]:
        await create_nodes(kube, f"lc{group}", n, {GROUP: group}, made=made)
        return list(made)

    make.group = group  # type: ignore[attr-defined]
    yield make
    for name in made:
        try:
            await kube.delete(NODES, name)
        except errors.NotFound:
            pass


async def start(kube, tmp_path, group: str, *, policy: str | None = None, lifecycle: str | None = None):
    registry = CollectorRegistry()
    settings = RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, namespace="default")
    mgr = Manager(kube, settings, registry=registry)
    plan = FaultPlan(tmp_path / "faults.json")
    if policy is not None:
        pol = load_policy(policy + f"\nnode_selector: {{{GROUP}: '{group}'}}\n", "test")
        await health_setup(mgr, HealthOptions(policy=pol, simulate=True, fault_file=str(plan.path), sim_interval=0.5,
                                              sim_heartbeat=60.0))
    if lifecycle is not None:
        cfg = load_lifecycle(lifecycle + f"\nnode_selector: {{{GROUP}: '{group}'}}\n", "test")
        await lifecycle_setup(mgr, LifecycleOptions(config=cfg))
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(60)
    return mgr, plan, registry, task


def bound_pod(namespace: str, name: str, node: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": "busybox"}]}}


async def place_gang(kube, namespace: str, nodes: list[str], extra: list[dict] = ()) -> None:
    """A gang "train" with one rank per node (rank-<i>), and ``extra`` pods; returns once all run."""
    for i, n in enumerate(nodes):
        await kube.create(PODS, bound_pod(namespace, f"rank-{i}", n, {N.gang: "train"}), namespace)
    for body in extra:
        await kube.create(PODS, body, namespace)

    async def running():
        items, _ = await kube.list(PODS, namespace)
        return sum(1 for p in items if (p.get("status") or {}).get("phase") == "Running") == len(nodes) + len(extra)
    await wait_for(running, 60, "the gang Running")


POLICY = """
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
drain: {deadline: 1h, retry_interval: 1s}
storm: {min_nodes: 50}
"""


async def test_a_gang_of_8_is_evicted_together_when_one_node_fails_and_counts_once(kube, namespace, own_nodes,
                                                                                      tmp_path):
    nodes = await own_nodes(8)
    await place_gang(kube, namespace, nodes, [bound_pod(namespace, "bystander", nodes[3])])
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
    try:
        plan.inject(nodes[5], parse_fault("ecc"))  # reset ladder: drain

        async def gang_gone():
            items, _ = await kube.list(PODS, namespace)
            alive = [p["metadata"]["name"] for p in items if not p["metadata"].get("deletionTimestamp")]
            return alive if alive == ["bystander"] else None
        await wait_for(gang_gone, 60, "all 8 ranks evicted, the bystander kept")
        evs = [e for e in await events_for(kube, nodes[5]) if e["reason"] == "GangEvicted"]
        assert len(evs) == 1 and "evicting 8 pod(s)" in evs[0]["note"] and f"{namespace}/train" in evs[0]["note"]
        # one disruption: only the failing node is out of service, in the budget and on the cluster
        for n in nodes:
            live = await kube.get(NODES, n)
            assert bool(taint(live, Q)) == (n == nodes[5]), n
        lc = mgr.lifecycle  # type: ignore[attr-defined]
        snap = lc.snapshot()
        assert snap.used("cluster") == 1 and set(snap.since) == {nodes[5]}
        lc.publish()
        assert registry.get_sample_value("fleetkeeper_disruption_budget_used_nodes", {"scope": "cluster"}) == 1
        assert registry.get_sample_value("fleetkeeper_node_writes_total",
                                         {"component": "health", "action": "evict", "result": "success"}) == 8
    finally:
        await stop(task)


class KubeProxy:
    """The real API client, with the calls a test overrides."""

    def __init__(self, kube):
        self._kube = kube

    def __getattr__(self, name):
        return getattr(self._kube, name)


class StopsAfterOneEviction(KubeProxy):
    """The API client of a process that dies part-way through a drain: its second eviction never returns."""

    def __init__(self, kube):
        super().__init__(kube)
        self.evicted: list[str] = []
        self.stuck = asyncio.Event()

    async def evict(self, namespace: str, name: str, **kw):
        if self.evicted:
            self.stuck.set()
            await asyncio.Event().wait()  # the process is killed here
        await self._kube.evict(namespace, name, **kw)
        self.evicted.append(name)


async def test_a_gang_eviction_cut_short_by_a_crash_is_finished_after_the_restart(kube, namespace, own_nodes,
                                                                                   tmp_path):
    """The node's own member is evicted last: it names the gang, so a restarted controller finds the rest."""
    nodes = await own_nodes(4)
    await place_gang(kube, namespace, nodes)
    dying = StopsAfterOneEviction(kube)
    mgr, plan, _, task = await start(dying, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
    try:
        plan.inject(nodes[0], parse_fault("ecc"))
        await asyncio.wait_for(dying.stuck.wait(), 60)
    finally:
        await stop(task)
    assert dying.evicted != ["rank-0"], "the failing node's own member went first: nothing left names the gang"
    mgr, plan, _, task = await start(kube, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
    try:
        async def gang_gone():
            items, _ = await kube.list(PODS, namespace)
            return not [p for p in items if not p["metadata"].get("deletionTimestamp")]
        await wait_for(gang_gone, 60, "every rank evicted after the restart")
    finally:
        await stop(task)


class CacheNeverCatchesUp(KubeProxy):
    """An API client whose evictions are answered but never seen by the watch (a cache far behind)."""

    def __init__(self, kube):
        super().__init__(kube)
        self.asked: list[str] = []

    async def evict(self, namespace: str, name: str, **kw):
        self.asked.append(name)


async def test_a_pod_evicted_is_not_evicted_again_while_the_cache_is_behind(kube, namespace, own_nodes, tmp_path):
    nodes = await own_nodes(2)
    await place_gang(kube, namespace, nodes)
    behind = CacheNeverCatchesUp(kube)
    mgr, plan, _, task = await start(behind, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
    try:
        plan.inject(nodes[0], parse_fault("ecc"))
        async def asked():
            return len(behind.asked) >= 2
        await wait_for(asked, 60, "the gang's eviction asked")
        health = mgr.health  # type: ignore[attr-defined]
        passes, evict = [0], health._evict

        async def counted(p, node):
            passes[0] += 1
            return await evict(p, node)
        health._evict = counted

        async def three():
            return passes[0] >= 3
        await wait_for(three, 60, "three more drain passes over the failing node")
        assert sorted(behind.asked) == ["rank-0", "rank-1"], behind.asked  # each once, siblings first
        assert behind.asked[0] == "rank-1"
    finally:
        await stop(task)


LIFECYCLE_SHORT = """
deadlines: {awaiting_repair: 4s, revalidating: 4s, retiring: 1h}
preflight_max_attempts: 3
"""


async def test_stuck_states_escalate_to_retire_and_terminate_once(kube, own_nodes, tmp_path):
    exhausted, no_repair, bad_revalidation, healthy, interrupted, announced = await own_nodes(6)
    now = int(time.time())
    gate_failed = {"spec": {"taints": [{"key": N.preflight, "value": "failed", "effect": "NoSchedule"}]}}
    await kube.patch(NODES, exhausted, {**gate_failed, "metadata": {
        "labels": {N.preflight: "failed"},
        "annotations": {"fleetkeeper.io/preflight-attempts": "3", "fleetkeeper.io/preflight-failed-check": "nccl"}}})
    await kube.patch(NODES, no_repair, {
        "spec": {"taints": [{"key": Q, "value": "GPUXidError-X79", "effect": "NoSchedule"}]},
        "metadata": {"annotations": {"fleetkeeper.io/health-action": "drain", "fleetkeeper.io/health-remedy": "reboot",
                                     "fleetkeeper.io/health-since": str(now)}}})
    await kube.patch(NODES, bad_revalidation, {**gate_failed, "metadata": {
        "labels": {N.preflight: "failed"},
        "annotations": {"fleetkeeper.io/preflight-attempts": "1", "fleetkeeper.io/health-state": "validating",
                        "fleetkeeper.io/preflight-gated-at": str(now)}}})
    # what a process killed between recording a termination and the machine layer's answer leaves behind:
    # its announcement died with it (interrupted) or was written (announced)
    for name in (interrupted, announced):
        await kube.patch(NODES, name, {
            "spec": {"taints": [{"key": Q, "value": "retiring", "effect": "NoSchedule"}]},
            "metadata": {"annotations": {"fleetkeeper.io/lifecycle-state": "retiring",
                                         "fleetkeeper.io/lifecycle-since": str(now),
                                         "fleetkeeper.io/lifecycle-reason": "nccl failed",
                                         "fleetkeeper.io/lifecycle-terminate-requested": str(now)}}})
    dead = EventRecorder(kube, "lifecycle")
    await dead.emit(node_ref(announced, (await kube.get(NODES, announced))["metadata"]["uid"]), "Retiring",
                    "nccl failed; terminating the machine", type_="Warning", id=f"retire@{now}")
    assert await dead.flush(30)
    mgr, _, registry, task = await start(kube, tmp_path, own_nodes.group, lifecycle=LIFECYCLE_SHORT)
    try:
        async def gone(name):
            return await kube.get_or_none(NODES, name) is None

        async def retiring_events(name):
            return [e for e in await events_for(kube, name) if e["reason"] == "Retiring"] or None

        # the machine layer (never acts twice) is asked again: the interrupted termination finishes
        for name in (interrupted, announced):
            await wait_for(lambda n=name: gone(n), 60, f"{name}'s interrupted termination finished")
            # announced once: made again by this process where it died with the first, kept where it did not
            evs = await wait_for(lambda n=name: retiring_events(n), 30, f"{name}'s Retiring event")
            assert [e["note"] for e in evs] == ["nccl failed; terminating the machine"], (name, evs)
            assert not any(e["reason"] == "RetireStuck" for e in await events_for(kube, name))
        for name in (exhausted, no_repair, bad_revalidation):
            await wait_for(lambda n=name: gone(n), 60, f"{name} retired and terminated")
        reasons = {}
        for name in (exhausted, no_repair, bad_revalidation):
            # the applier records the Event after the provider answered: it may trail the Node's deletion
            async def retired(n=name):
                evs = await events_for(kube, n)
                return evs if any(e["reason"] == "Retiring" for e in evs) else None
            evs = await wait_for(retired, 30, f"{name}'s Retiring event")
            reasons[name] = [e["reason"] for e in evs]
            retiring = [e for e in evs if e["reason"] == "Retiring"]
            assert len(retiring) == 1, (name, reasons[name])
        assert "preflight attempts used up" in next(
            e["note"] for e in await events_for(kube, exhausted) if e["reason"] == "Retiring")
        assert "Escalated" in reasons[no_repair] and "Escalated" in reasons[bad_revalidation]
        esc = next(e["note"] for e in await events_for(kube, no_repair) if e["reason"] == "Escalated")
        assert "awaiting-repair" in esc and "replace" in esc
        assert await kube.get_or_none(NODES, healthy) is not None
        assert registry.get_sample_value("fleetkeeper_node_writes_total",
                                         {"component": "lifecycle", "action": "terminate", "result": "success"}) >= 3
    finally:
        await stop(task)


async def test_health_and_periodic_preflight_share_one_budget_in_a_30_percent_storm(kube, own_nodes, tmp_path):
    nodes = await own_nodes(10)
    # a periodic re-test already took one validated node out of service (what preflight writes)
    retested = nodes[9]
    await kube.patch(NODES, retested, {
        "spec": {"taints": [{"key": N.preflight, "value": "failed", "effect": "NoSchedule"}]},
        "metadata": {"labels": {N.preflight: "failed"},
                     "annotations": {N.validated_at: str(int(time.time()) - 100),
                                     "fleetkeeper.io/preflight-gated-at": str(int(time.time())),
                                     "fleetkeeper.io/preflight-attempts": "1"}}})
    policy = """
budget: {cluster: {max_nodes: 3}, zone: {max_percent: 100}, rack: {max_nodes: 10}, max_new_per_window: 100}
drain: {deadline: 1h, retry_interval: 1s}
storm: {min_nodes: 50}
"""
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy=policy)
    try:
        faulty = nodes[:3]  # 30 % of the nodes fault at once
        for n in faulty:
            plan.inject(n, parse_fault("ecc"))

        async def quarantined():
            out = [n for n in faulty if taint(await kube.get(NODES, n), Q)]
            return out if len(out) == 2 else None
        await wait_for(quarantined, 60, "two of three quarantined (the re-test holds the third unit)")

        async def exhausted_event():
            for n in faulty:
                if any(e["reason"] == "BudgetExhausted" for e in await events_for(kube, n)):
                    return n
            return None
        waiting = await wait_for(exhausted_event, 30, "BudgetExhausted on the third faulty node")
        await asyncio.sleep(2)  # nothing more may be admitted while the budget is full
        assert len([n for n in faulty if taint(await kube.get(NODES, n), Q)]) == 2
        # preflight asks the same budget for its next periodic removal, and is refused
        pf = Preflight(mgr, PreflightConfig(node_selector={GROUP: own_nodes.group}))
        admitted, why = pf.periodic_admission(mgr.node_informer().get(nodes[5]), time.time())
        assert not admitted and "cluster" in why
        # the re-tested node passes and returns: its unit goes to the waiting node
        await kube.patch(NODES, retested, {"spec": {"taints": None}, "metadata": {"labels": {N.preflight: None}}})

        async def third():
            return taint(await kube.get(NODES, waiting), Q)
        await wait_for(third, 30, "the freed unit goes to the waiting node")
        snap = bud.snapshot(mgr.node_informer().items(), N, bud.BudgetConfig(),
                            lambda n: n.labels.get(GROUP) == own_nodes.group)
        assert snap.used("cluster") == 3
    finally:
        await stop(task)


WINDOW_POLICY = POLICY + """
rules:
- {type: GPUUnhealthy, reason: RemapPending, remedy: reset, trigger_after: 1h}
- {type: GPUUnhealthy, reason: UncorrectableECC, remedy: reset}
actions: {timeout: 1h}
"""


async def test_the_nodes_of_a_gang_with_reset_faults_are_repaired_in_one_window(kube, namespace, own_nodes, tmp_path):
    """A gang of 4; one node fails (ECC, reset), another has a reset-class fault still pending (its own
    trigger is an hour away). The drain of the first opens one window: both are drained with the gang, the
    reset of neither is asked while the other still has a pod (a PodDisruptionBudget holds one), then both
    are reset, and the budget counts one."""
    nodes = await own_nodes(4)
    lead, pending = nodes[0], nodes[2]
    await kube.create(PDBS, {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                             "metadata": {"name": "hold", "namespace": namespace},
                             "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "held"}}}}, namespace)
    await place_gang(kube, namespace, nodes, [bound_pod(namespace, "held", pending, {"app": "held"})])
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy=WINDOW_POLICY, lifecycle="")
    try:
        plan.inject(pending, parse_fault("remap-pending"))

        async def pending_reported():
            n = await kube.get(NODES, pending)
            return any(c["type"] == "GPUUnhealthy" and c["status"] == "True" for c in n["status"]["conditions"])
        await wait_for(pending_reported, 30, "the pending fault reported")
        assert not taint(await kube.get(NODES, pending), Q)  # alone it would wait an hour
        plan.inject(lead, parse_fault("ecc"))

        async def gang_gone():
            items, _ = await kube.list(PODS, namespace)
            alive = [p["metadata"]["name"] for p in items if not p["metadata"].get("deletionTimestamp")]
            return alive if alive == ["held"] else None
        await wait_for(gang_gone, 60, "all 4 ranks evicted, the held pod kept")
        window = f"{namespace}/train@"
        for n in (lead, pending):
            live = await kube.get(NODES, n)
            assert taint(live, Q), n
            assert live["metadata"]["annotations"]["fleetkeeper.io/lifecycle-gang"].startswith(window), n
        for n in (nodes[1], nodes[3]):
            assert not taint(await kube.get(NODES, n), Q), n
        evs = [e for e in await events_for(kube, lead) if e["reason"] == "GangEvicted"]
        assert len(evs) == 1 and pending in evs[0]["note"], evs
        # one disruption
        lc = mgr.lifecycle  # type: ignore[attr-defined]
        assert lc.snapshot().used("cluster") == 1

        # the lead is drained, but the held pod keeps the window open: no reset is asked yet
        async def lead_waits():
            return any(e["reason"] == "WaitingForRepairWindow" for e in await events_for(kube, lead))
        await wait_for(lead_waits, 60, "the lead waiting for the window")
        from fleetkeeper.health.explain import explain_node

        lines = await explain_node(kube, N, lead)
        assert any("gang repair window" in x and f"still draining: {pending}" in x for x in lines), lines
        for n in (lead, pending):
            assert "fleetkeeper.io/action-request" not in (await kube.get(NODES, n))["metadata"].get(
                "annotations", {}), n
        await kube.delete(PDBS, "hold", namespace)

        async def both_asked():
            asked = []
            for n in (lead, pending):
                a = (await kube.get(NODES, n))["metadata"].get("annotations") or {}
                if "fleetkeeper.io/action-request" in a:
                    asked.append(json.loads(a["fleetkeeper.io/action-request"]))
            return asked if len(asked) == 2 else None
        asked = await wait_for(both_asked, 60, "both nodes' resets asked")
        assert {r["action"] for r in asked} == {"reset"}
        for n in (lead, pending):
            assert [e["reason"] for e in await events_for(kube, n)].count("ActionRequested") == 1, n
    finally:
        await stop(task)


class EventsNeverWritten(KubeProxy):
    """The API client of a process killed after its node writes, before their Events were written."""

    async def create(self, res, body, *args, **kw):
        if res is EVENTS:
            await asyncio.Event().wait()  # the process is killed here
        return await self._kube.create(res, body, *args, **kw)


async def test_a_quarantine_whose_event_died_with_the_process_is_announced_by_the_next(kube, namespace, own_nodes,
                                                                                         tmp_path):
    """Events are written off the write path: a kill after the quarantine's node write loses its Event. The
    next process announces the node's recent writes again, under names derived from the node's history, so
    a third process adds none."""
    nodes = await own_nodes(1)
    dying = EventsNeverWritten(kube)
    mgr, plan, _, task = await start(dying, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
    try:
        plan.inject(nodes[0], parse_fault("ecc"))

        async def quarantined():
            return bool(taint(await kube.get(NODES, nodes[0]), Q))
        await wait_for(quarantined, 60, "the node quarantined")
    finally:
        await stop(task)
        for r in list(events_mod._RECORDERS):
            if r.kube is dying:
                await r.close(0.1)  # the killed process's unwritten Events die with it
    mine = lambda evs: [e for e in evs if e["reason"] == "Quarantined"  # noqa: E731
                        and e.get("reportingController") == "fleetkeeper.io/health"]
    assert not mine(await events_for(kube, nodes[0])), "the first process wrote no Event"
    for restart in range(2):
        mgr, plan, _, task = await start(kube, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
        try:
            async def announced():
                return mine(await events_for(kube, nodes[0]))
            evs = await wait_for(announced, 60, "the quarantine announced by the next process")
            await asyncio.sleep(1.0 if restart else 0.0)  # (a second restart's announcement has been made)
            evs = mine(await events_for(kube, nodes[0]))
            assert len(evs) == 1 and evs[0]["type"] == "Warning" and "tainted" in evs[0]["note"], evs
        finally:
            await stop(task)


class EventsAskedNeverWritten(EventsNeverWritten):
    """As EventsNeverWritten, keeping what each Event would have said."""

    def __init__(self, kube):
        super().__init__(kube)
        self.asked: list[dict] = []

    async def create(self, res, body, *args, **kw):
        if res is EVENTS:
            self.asked.append(body)
        return await super().create(res, body, *args, **kw)


async def test_no_pod_is_evicted_before_its_event_is_written(kube, namespace, own_nodes, tmp_path):
    """An eviction's Event is written before the eviction, not queued after it: a process killed after
    evicting used to leave the eviction without an Event, and the next process found no pod left to announce.
    The first process here never gets an Event written: it evicts nothing. The next one evicts and announces;
    the Event names the pod."""
    nodes = await own_nodes(1)
    await kube.create(PODS, bound_pod(namespace, "worker", nodes[0]), namespace)
    dying = EventsAskedNeverWritten(kube)
    mgr, plan, _, task = await start(dying, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
    try:
        plan.inject(nodes[0], parse_fault("ecc"))  # reset ladder: drain

        async def eviction_announced():
            return [b for b in dying.asked if b["reason"] == "Evicting"]
        asked = await wait_for(eviction_announced, 60, "the eviction's Event asked for")
        assert "worker" in asked[0]["note"] and asked[0]["type"] == "Warning", asked[0]
    finally:
        await stop(task)
        for r in list(events_mod._RECORDERS):
            if r.kube is dying:
                await r.close(0.1)
    pod = await kube.get(PODS, "worker", namespace)
    assert not pod["metadata"].get("deletionTimestamp"), "evicted though its Event was never written"
    mgr, plan, _, task = await start(kube, tmp_path, own_nodes.group, policy=POLICY, lifecycle="")
    try:
        async def gone():
            try:
                p = await kube.get(PODS, "worker", namespace)
            except errors.NotFound:
                return True
            return bool(p["metadata"].get("deletionTimestamp"))
        await wait_for(gone, 60, "the pod evicted by the next process")
        evs = [e for e in await events_for(kube, nodes[0]) if e["reason"] == "Evicting"
               and e.get("reportingController") == "fleetkeeper.io/health"]
        assert len(evs) == 1 and f"{namespace}/worker" in evs[0]["note"] and "evicting 1 pod(s)" in evs[0]["note"], evs
    finally:
        await stop(task)
