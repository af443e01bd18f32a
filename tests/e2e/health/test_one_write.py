"""An uncorrectable-ECC fault on a node with nothing to drain is ONE node write by the health
controller: the quarantine taint and the reset's request together (one state transition), each
with its Event and metric; a restarted controller reads the request back and does not ask again;
dry-run writes nothing (and says so). A node with a pod keeps the old path: quarantine, the pod evicted, then the
request. On the real local control plane; the node writes are counted in a watch of the nodes.

No simulated agent runs here: the test writes the agent's condition itself, and nothing performs
the reset, so the request stays on the node for the restarted controller to find."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.faults import parse_fault
from fleetkeeper.core.kube import NODES, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.actionproto import Request
from fleetkeeper.health.agent import AgentCore, ConditionWriter, simulated_findings
from fleetkeeper.health.controller import HealthOptions, setup
from fleetkeeper.health.policy import load_policy
from e2e_helpers import create_nodes, events_for, stop, taint, wait_for

GROUP = "fleetkeeper.io/e2e-one-write"
Q, REQ = "fleetkeeper.io/quarantine", "fleetkeeper.io/action-request"
DOMAIN = "fleetkeeper.io/"

POLICY = """
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
storm: {min_nodes: 50}
drain: {deadline: 1h, retry_interval: 1s}
actions: {timeout: 1h}
"""


@pytest.fixture
async def nodes(kube):
    group = secrets.token_hex(3)
    names: list[str] = []
    await create_nodes(kube, f"ow{group}", 2, {GROUP: group}, made=names)
    try:
        yield group, names
    finally:
        for name in names:
            try:
                await kube.delete(NODES, name)
            except errors.NotFound:
                pass


async def start(kube, group: str, *, dry_run: bool = False):
    registry = CollectorRegistry()
    settings = RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, namespace="default",
                               dry_run=dry_run)
    mgr = Manager(kube, settings, registry=registry)
    policy = load_policy(POLICY + f"\nnode_selector: {{{GROUP}: '{group}'}}\n", "test")
    await setup(mgr, HealthOptions(policy=policy, simulate=False))
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(60)
    return mgr, registry, task


def _mark(obj: dict) -> tuple:
    """What the health controller writes on a node: its taints and fleetkeeper's annotations (the
    history aside: it changes with every write anyway)."""
    md = obj["metadata"]
    ann = {k: v for k, v in (md.get("annotations") or {}).items()
           if k.startswith(DOMAIN) and not k.endswith("health-history")}
    taints = sorted((t["key"], t.get("value", "")) for t in (obj.get("spec") or {}).get("taints") or [])
    return tuple(sorted(ann.items())), tuple(taints)


class NodeWrites:
    """Every change of the controller's marks on the watched nodes, in watch order."""

    def __init__(self, kube, names: list[str]):
        self.kube, self.names = kube, set(names)
        self.changes: dict[str, list[dict]] = {n: [] for n in names}
        self._last: dict[str, tuple] = {}
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        items, rv = await self.kube.list(NODES)
        for o in items:
            if o["metadata"]["name"] in self.names:
                self._last[o["metadata"]["name"]] = _mark(o)
        self.task = asyncio.create_task(self._run(rv))

    async def _run(self, rv: str) -> None:
        async for typ, obj in self.kube.watch(NODES, rv, timeout_seconds=600):
            name = obj["metadata"]["name"]
            if typ != "MODIFIED" or name not in self.names:
                continue
            m = _mark(obj)
            if m != self._last.get(name):
                self._last[name] = m
                self.changes[name].append(obj)

    async def close(self) -> None:
        if self.task is not None:
            await stop(self.task)


def writes(registry: CollectorRegistry, result: str = "success") -> float:
    return sum(s.value for m in registry.collect() for s in m.samples
               if s.name == "fleetkeeper_node_writes_total" and s.labels.get("component") == "health"
               and s.labels.get("result") == result)


def actions(registry: CollectorRegistry, action: str) -> float:
    return registry.get_sample_value("fleetkeeper_remediation_actions_total",
                                     {"action": action, "result": "success"}) or 0.0


async def counted(registry: CollectorRegistry, *, node_writes: int = 0, quarantine: int = 0,
                  request: int = 0) -> bool:
    """At least these counts (a wait's condition: the exact values are asserted after it)."""
    return (writes(registry) >= node_writes and actions(registry, "quarantine") >= quarantine
            and actions(registry, "request") >= request)


async def test_ecc_on_an_empty_node_is_one_write_and_a_restart_does_not_ask_again(kube, nodes):
    group, (node, _) = nodes
    agent = AgentCore(ConditionWriter(kube), RealClock(), heartbeat=3600)
    await agent.observe(node, simulated_findings(node, [], 8))  # healthy first, as an agent starts
    seen = NodeWrites(kube, [node])
    await seen.start()
    mgr, registry, task = await start(kube, group)
    try:
        await agent.observe(node, simulated_findings(node, [parse_fault("ecc")], 8))

        async def requested():
            n = await kube.get(NODES, node)
            return n if REQ in n["metadata"].get("annotations", {}) else None
        n = await wait_for(requested, 60, "the reset's request on the node")
        req = Request.loads(n["metadata"]["annotations"][REQ])
        assert (req.action, req.node, req.uid) == ("reset", node, n["metadata"]["uid"])

        async def watched():
            return seen.changes[node] and REQ in seen.changes[node][-1]["metadata"].get("annotations", {})
        await wait_for(watched, 30, "the request in the watch")
        # the controller counts a write and records its Events once the API server has answered it:
        # the watch (another connection) can show the write before that answer is read
        await wait_for(lambda: counted(registry, node_writes=1, quarantine=1, request=1), 30,
                       "the write and both actions counted")
        # one write: the first change the watch shows is the taint and the request together
        assert len(seen.changes[node]) == 1, [_mark(o) for o in seen.changes[node]]
        assert taint(seen.changes[node][0], Q) is not None
        assert writes(registry) == 1
        assert actions(registry, "quarantine") == 1 and actions(registry, "request") == 1
        # both steps announced: the quarantine's Event and the request's (with its nonce)
        async def announced():
            evs = {e["reason"]: e["note"] for e in await events_for(kube, node)}
            return evs if "Quarantined" in evs and req.nonce in evs.get("ActionRequested", "") else None
        await wait_for(announced, 30, "the Quarantined and ActionRequested Events")

        # a restarted controller reads the request back: it waits for the agent, asks nothing again
        await stop(task)
        mgr, registry, task = await start(kube, group)

        async def reconciled():  # both nodes of the selector, the faulty one among them
            return sum(registry.get_sample_value("fleetkeeper_reconcile_total",
                                                 {"controller": "health", "result": r}) or 0
                       for r in ("success", "requeue")) >= 2
        await wait_for(reconciled, 60, "the restarted controller's reconcile of both nodes")
        assert writes(registry) == 0 and actions(registry, "request") == 0
        n = await kube.get(NODES, node)
        assert Request.loads(n["metadata"]["annotations"][REQ]).nonce == req.nonce
        assert len(seen.changes[node]) == 1
    finally:
        await stop(task)
        await seen.close()


async def test_a_node_with_a_pod_is_quarantined_drained_then_asked(kube, namespace, nodes):
    group, (node, _) = nodes
    agent = AgentCore(ConditionWriter(kube), RealClock(), heartbeat=3600)
    await agent.observe(node, simulated_findings(node, [], 8))
    await kube.create(PODS, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "work", "namespace": namespace},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "busybox"}]}}, namespace)

    async def running():
        p = await kube.get(PODS, "work", namespace)
        return (p.get("status") or {}).get("phase") == "Running"
    await wait_for(running, 60, "the pod running")
    seen = NodeWrites(kube, [node])
    await seen.start()
    mgr, registry, task = await start(kube, group)
    try:
        await agent.observe(node, simulated_findings(node, [parse_fault("ecc")], 8))

        async def requested():
            ch = seen.changes[node]
            return ch and REQ in ch[-1]["metadata"].get("annotations", {})
        await wait_for(requested, 90, "the request after the drain")
        assert await kube.get_or_none(PODS, "work", namespace) is None  # evicted before the request
        first = seen.changes[node][0]
        assert taint(first, Q) is not None and REQ not in first["metadata"].get("annotations", {})
        assert len(seen.changes[node]) == 2, [_mark(o) for o in seen.changes[node]]
        await wait_for(lambda: counted(registry, quarantine=1, request=1), 30, "both actions counted")
        assert actions(registry, "quarantine") == 1 and actions(registry, "request") == 1
    finally:
        await stop(task)
        await seen.close()


async def test_dry_run_writes_nothing_and_says_what_it_would_do(kube, nodes):
    group, (node, _) = nodes
    agent = AgentCore(ConditionWriter(kube), RealClock(), heartbeat=3600)
    await agent.observe(node, simulated_findings(node, [], 8))
    seen = NodeWrites(kube, [node])
    await seen.start()
    mgr, registry, task = await start(kube, group, dry_run=True)
    try:
        await agent.observe(node, simulated_findings(node, [parse_fault("ecc")], 8))

        async def said():  # in dry-run the Events are logged and counted, not written either
            return all(registry.get_sample_value("fleetkeeper_events_total", {"reason": r, "type": "Normal"})
                       for r in ("DryRunQuarantined", "DryRunActionRequested"))
        await wait_for(said, 60, "the dry-run Events for the quarantine and the request")
        assert writes(registry, "dry_run") >= 1 and writes(registry) == 0
        n = await kube.get(NODES, node)
        assert taint(n, Q) is None and REQ not in n["metadata"].get("annotations", {})
        assert seen.changes[node] == []
    finally:
        await stop(task)
        await seen.close()
