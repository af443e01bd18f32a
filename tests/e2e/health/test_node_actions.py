"""Node-local actions end to end on the real local control plane, with simulated agents:
an Xid 79 node is drained, rebooted by its agent, revalidated by the preflight gate and back
in service; an uncorrectable-ECC node whose reset does not clear the fault is escalated to
replace at the action's deadline, and its machine terminated once."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.faults import FaultPlan, parse_fault
from fleetkeeper.core.kube import CONFIGMAPS, EVENTS, NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.actions import Report, Request
from fleetkeeper.health.controller import HealthOptions, setup
from fleetkeeper.health.policy import load_policy
from fleetkeeper.machines.ledger import KEY, LEDGER_CONFIGMAP
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.controller import Preflight
from e2e_helpers import create_nodes, taint, wait_for

GROUP = "fleetkeeper.io/e2e-actions"
Q, PF = "fleetkeeper.io/quarantine", "fleetkeeper.io/preflight"
REQ, RES = "fleetkeeper.io/action-request", "fleetkeeper.io/action-result"

POLICY = """
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
storm: {min_nodes: 50}
drain: {deadline: 1h, retry_interval: 1s}
actions: {timeout: 8s}
return_to_service: {mode: preflight}
rules:
- {type: GPUXidError, clear_after: 1s}
- {type: GPUUnhealthy, reason: UncorrectableECC, remedy: reset, clear_after: 1s}
- {type: GPUUnhealthy, reason: GPULost, remedy: reboot, clear_after: 1s}
- {type: GPUUnhealthy, reason: "*", remedy: investigate, action: quarantine, clear_after: 1s}
"""


@pytest.fixture
async def fleet(kube, namespace, tmp_path):
    group = secrets.token_hex(3)
    names: list[str] = []
    await create_nodes(kube, f"na{group}", 2, {GROUP: group}, made=names)
    registry = CollectorRegistry()
    settings = RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, namespace=namespace)
    mgr = Manager(kube, settings, registry=registry, identity="test")
    plan = FaultPlan(tmp_path / "faults.json")
    policy = load_policy(POLICY + f"\nnode_selector: {{{GROUP}: '{group}'}}\n", "test")
    await setup(mgr, HealthOptions(policy=policy, simulate=True, fault_file=str(plan.path), sim_interval=0.5,
                                   sim_heartbeat=60.0))
    Preflight(mgr, PreflightConfig.model_validate({
        "namespace": namespace, "fault_file": str(plan.path), "node_selector": {GROUP: group},
        "gate": {"max_attempts": 3, "retry_backoff_s": 2, "sim_duration_ms": 500},
        "periodic": {"enabled": False}, "webhook": {"enabled": False}})).register()
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(60)
    try:
        yield names, plan, mgr, registry
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for name in names:
            try:
                await kube.delete(NODES, name)
            except errors.NotFound:
                pass


async def test_xid79_node_rebooted_by_its_agent_revalidated_and_back(kube, namespace, fleet):
    (node, other), plan, mgr, registry = fleet
    plan.inject(node, parse_fault("xid:79"))

    async def requested():
        n = await kube.get(NODES, node)
        return n if REQ in n["metadata"].get("annotations", {}) else None
    n = await wait_for(requested, 40, "an action request after the drain")
    ann = n["metadata"]["annotations"]
    assert ann["fleetkeeper.io/health-remedy"] == "reboot"
    req = Request.loads(ann[REQ])
    assert (req.action, req.node, req.uid) == ("reboot", node, n["metadata"]["uid"])

    # the simulated agent reboots (clears the Xid), reports; the node goes through the preflight gate
    # and comes back to service with every marker gone
    seen = {"result": None, "validating": False}

    async def back_in_service():
        n = await kube.get(NODES, node)
        a = n["metadata"].get("annotations", {})
        if RES in a:
            seen["result"] = Report.loads(a[RES])
        if taint(n, PF):
            seen["validating"] = True
        done = not taint(n, Q) and not taint(n, PF) and not any(k.startswith("fleetkeeper.io/health-") and
                                                                k != "fleetkeeper.io/health-history" for k in a)
        return n if done and seen["validating"] else None
    n = await wait_for(back_in_service, 90, "reboot -> preflight -> back in service")
    assert REQ not in n["metadata"]["annotations"] and RES not in n["metadata"]["annotations"]
    # the agent's report (on the node only until the return clears the markers: read it from the agent's log
    # of started nonces, which is what it wrote)
    rep = mgr.simulated_agents.actor.done.get(req.nonce)["report"]  # type: ignore[attr-defined]
    assert rep["nonce"] == req.nonce and rep["outcome"] == "succeeded" and "xid:79" in rep["message"]
    assert seen["result"] is None or seen["result"] == Report(**rep)
    assert mgr.simulated_agents.actor.performed == 1  # type: ignore[attr-defined]
    assert [f for f in plan.faults(node)] == []
    # requested after the drain, handed to the gate, passed (the gate's own write ends the hand-over);
    # an Event is written after its node write, off the write path, so it may trail what the node shows
    want = {"Drained", "ActionRequested", "ReturnedToValidation", "PreflightPassed"}

    async def reasons():
        evs, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name={node}")
        got = {e["reason"] for e in evs}
        return got if want <= got else None
    await mgr.flush_events(60)  # Events are written off the write path, by the recorders' sinks
    await wait_for(reasons, 60, f"the events {sorted(want)}")
    assert await kube.get_or_none(NODES, node) is not None
    assert registry.get_sample_value("fleetkeeper_remediation_actions_total",
                                     {"action": "request", "result": "success"}) == 1


async def test_ecc_that_reset_does_not_clear_is_replaced_at_the_deadline(kube, namespace, fleet):
    (node, other), plan, mgr, registry = fleet
    plan.inject(node, parse_fault("ecc-stuck"))
    uid = (await kube.get(NODES, node))["metadata"]["uid"]

    async def reported():
        n = await kube.get_or_none(NODES, node)
        a = (n or {}).get("metadata", {}).get("annotations", {})
        return Report.loads(a.get(RES)) if RES in a else None
    rep = await wait_for(reported, 40, "the reset's report")
    assert rep.outcome == "succeeded" and "cleared nothing" in rep.message

    async def gone():
        return await kube.get_or_none(NODES, node) is None
    await wait_for(gone, 60, "replace at the action's deadline")
    async def events():  # the applier records the Event after the provider answered: it may trail the delete
        evs, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name={node}")
        return evs if any(e["reason"] == "Terminated" for e in evs) else None
    evs = await wait_for(events, 30, "the Terminated event")
    esc = [e for e in evs if e["reason"] == "Escalated"]
    assert esc and "did not clear by its deadline" in esc[0]["note"]
    cm = await kube.get(CONFIGMAPS, LEDGER_CONFIGMAP, namespace)
    entries = [e for e in json.loads(cm["data"][KEY]) if e["node"] == node]
    assert [(e["uid"], e["action"], e["state"], e["provider"]) for e in entries] == \
        [(uid, "terminate", "done", "kubernetes-node")]
    assert mgr.simulated_agents.actor.performed == 1  # type: ignore[attr-defined]  # reset once, never again
    assert await kube.get_or_none(NODES, other) is not None
