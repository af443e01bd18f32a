"""The remediation ladder on the real local control plane, on this test's own
KWOK nodes (prefix "hl"), with simulated agents reading a fault plan; and the
Helm chart's RBAC (charts/fleetkeeper) is enough and each rule needed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.faults import FaultPlan, parse_fault
from fleetkeeper.core.kube import CONFIGMAPS, LEASES, NAMESPACES, NODES, PDBS, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.agent import AgentCore, ConditionWriter, simulated_findings
from fleetkeeper.health.controller import FLAPS_KEY, STATE_CONFIGMAP, STORM_UNTIL_KEY, HealthOptions, setup
from fleetkeeper.health.actionproto import Report
from fleetkeeper.health.policy import load_policy
from fleetkeeper.machines.ledger import LEDGER_CONFIGMAP
from e2e_helpers import create_nodes, events_for, stop, taint, wait_for

GROUP = "fleetkeeper.io/e2e-group"


@pytest.fixture
async def own_nodes(kube):
    made: list[str] = []
    group = secrets.token_hex(3)

    async def make(n: int, racks: int = 1) -> list[str]:
        await create_nodes(kube, f"hl{group}", n, {GROUP: group}, racks=racks, made=made)
        return list(made)

    make.group = group  # type: ignore[attr-defined]
    yield make
    for name in made:
        try:
            await kube.delete(NODES, name)
        except errors.NotFound:
            pass


async def start(kube, tmp_path, group: str, policy_yaml: str, **opts):
    registry = CollectorRegistry()
    settings = RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, namespace="default")
    mgr = Manager(kube, settings, registry=registry)
    policy = load_policy(policy_yaml + f"\nnode_selector: {{{GROUP}: '{group}'}}\n", "test")
    plan = FaultPlan(tmp_path / "faults.json")
    await setup(mgr, HealthOptions(policy=policy, simulate=True, fault_file=str(plan.path), sim_interval=0.5,
                                   sim_heartbeat=60.0, **opts))
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(60)
    return mgr, plan, registry, task


POLICY = """
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
drain: {deadline: 8s, retry_interval: 1s}
storm: {min_nodes: 50}
"""


async def test_ecc_quarantines_severe_fault_evicts_pdb_holds_until_deadline(kube, namespace, own_nodes, tmp_path):
    nodes = await own_nodes(3)
    ecc_node, lost_node, _ = nodes
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, POLICY)
    try:
        # pods on the node whose GPUs will go missing (replace -> terminate ladder), one guarded by a PDB
        for i in range(2):
            await kube.create(PODS, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"work-{i}", "namespace": namespace, "labels": {"app": f"w{i}"}},
                "spec": {"nodeName": lost_node, "terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "busybox"}]}}, namespace)
        await kube.create(PDBS, {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                                 "metadata": {"name": "hold", "namespace": namespace},
                                 "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "w1"}}}},
                          namespace)

        async def running():
            items, _ = await kube.list(PODS, namespace)
            return sum(1 for p in items if (p.get("status") or {}).get("phase") == "Running") == 2
        await wait_for(running, 30, "pods Running")

        plan.inject(ecc_node, parse_fault("ecc"))
        plan.inject(lost_node, parse_fault("gpu-missing"))

        async def quarantined(name=ecc_node):
            n = await kube.get(NODES, name)
            return n if taint(n, "fleetkeeper.io/quarantine") else None
        n = await wait_for(quarantined, 20, "ECC quarantine")
        cond = next(c for c in n["status"]["conditions"] if c["type"] == "GPUUnhealthy")
        assert cond["status"] == "True" and cond["reason"] == "UncorrectableECC"
        assert n["metadata"]["annotations"]["fleetkeeper.io/health-remedy"] == "reset"
        assert taint(n, "fleetkeeper.io/quarantine")["effect"] == "NoSchedule"

        # the severe fault evicts the unprotected pod; the PDB keeps the other one
        async def work0_gone():
            p = await kube.get_or_none(PODS, "work-0", namespace)
            return p is None or bool(p["metadata"].get("deletionTimestamp"))
        await wait_for(work0_gone, 20, "work-0 evicted")
        w1 = await kube.get_or_none(PODS, "work-1", namespace)
        assert w1 is not None and not w1["metadata"].get("deletionTimestamp")
        ln = await kube.get(NODES, lost_node)
        assert ln["metadata"]["annotations"]["fleetkeeper.io/health-action"] == "terminate"

        async def blocked_event():
            return any(e["reason"] == "EvictionBlocked" for e in await events_for(kube, lost_node))
        await wait_for(blocked_event, 15, "EvictionBlocked event")

        # at the deadline the node is terminated anyway, with an Event saying why
        async def node_gone():
            return await kube.get_or_none(NODES, lost_node) is None
        await wait_for(node_gone, 30, "termination at the deadline")
        # the Event is written after the machine is gone: wait for it rather than reading once
        term: list = []

        async def terminated_event():
            term[:] = [e for e in await events_for(kube, lost_node) if e["reason"] == "TerminatedAtDeadline"]
            return bool(term)
        await wait_for(terminated_event, 15, "TerminatedAtDeadline event")
        assert "PodDisruptionBudget" in term[0]["note"]
        assert registry.get_sample_value("fleetkeeper_remediation_actions_total",
                                         {"action": "terminate", "result": "success"}) == 1
        # the ECC node (reset ladder) was drained, not terminated
        assert await kube.get_or_none(NODES, ecc_node) is not None
    finally:
        await stop(task)


async def test_budget_holds_most_of_a_storm(kube, own_nodes, tmp_path):
    nodes = await own_nodes(10)
    policy = """
rules: [{type: GPUUnhealthy, reason: UncorrectableECC, remedy: reset, action: quarantine, clear_after: 1s}]
budget: {cluster: {max_nodes: 2}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
storm: {min_nodes: 50}
return_to_service: {mode: preflight}
"""
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy)
    try:
        for n in nodes[:3]:  # 30 % of the fleet at once
            plan.inject(n, parse_fault("ecc"))

        async def tainted():
            out = []
            for n in nodes:
                if taint(await kube.get(NODES, n), "fleetkeeper.io/quarantine"):
                    out.append(n)
            return out

        async def two():
            return len(await tainted()) == 2 and registry.get_sample_value(
                "fleetkeeper_remediation_budget_exhausted", {"scope": "cluster"}) == 1
        await wait_for(two, 20, "two quarantined and the budget alert")
        await asyncio.sleep(2.0)  # give the controller a chance to over-act; it must not
        held = await tainted()
        assert len(held) == 2
        waiting = [n for n in nodes[:3] if n not in held][0]
        assert any(e["reason"] == "BudgetExhausted" for e in await events_for(kube, waiting))
        assert registry.get_sample_value("fleetkeeper_remediation_budget_used_ratio", {"scope": "cluster"}) == 1.0

        # a restarted controller continues from the cluster's state: no double action
        await stop(task)
        mgr2, _, registry2, task = await start(kube, tmp_path, own_nodes.group, policy)
        await asyncio.sleep(2.0)
        assert sorted(await tainted()) == sorted(held)
        assert registry2.get_sample_value("fleetkeeper_remediation_actions_total",
                                          {"action": "quarantine", "result": "success"}) == 0

        # the cleared node goes to the preflight gate, not straight back to service
        plan.clear(held[0])

        async def validating():
            n = await kube.get(NODES, held[0])
            return n if taint(n, "fleetkeeper.io/preflight") and not taint(n, "fleetkeeper.io/quarantine") else None
        n = await wait_for(validating, 30, "hand-over to preflight")
        assert n["metadata"]["labels"]["fleetkeeper.io/preflight"] == "pending"
        assert n["metadata"]["annotations"]["fleetkeeper.io/health-state"] == "validating"
        # the freed budget goes to the waiting node
        async def waiting_taken():
            return taint(await kube.get(NODES, waiting), "fleetkeeper.io/quarantine") is not None
        await wait_for(waiting_taken, 20, "the waiting node admitted")
    finally:
        await stop(task)


async def test_flapping_does_not_churn_and_hold_delays_return(kube, own_nodes, tmp_path):
    nodes = await own_nodes(2)
    flappy, held = nodes
    policy = """
rules:
  - {type: NetworkUnreachable, remedy: investigate, action: quarantine, trigger_after: 30s, clear_after: 2s}
  - {type: GPUUnhealthy, reason: UncorrectableECC, remedy: reset, action: quarantine, clear_after: 1s}
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
flapping: {transitions: 4, window: 10m}
return_to_service: {mode: hold, hold: 4s}
storm: {min_nodes: 50}
"""
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy)
    try:
        plan.inject(held, parse_fault("ecc"))

        async def is_tainted(name):
            return taint(await kube.get(NODES, name), "fleetkeeper.io/quarantine") is not None

        async def cond(name, typ):
            n = await kube.get(NODES, name)
            return next((c["status"] for c in n["status"]["conditions"] if c["type"] == typ), None)

        # the network condition flaps faster than trigger_after: no taint on each flap
        for i in range(3):
            plan.inject(flappy, parse_fault("net-down"))
            await wait_for(lambda: _eq(cond(flappy, "NetworkUnreachable"), "True"), 10, "net down")
            if i < 2:  # fewer than 4 transitions so far: no taint for a flap
                assert not await is_tainted(flappy)
            plan.clear(flappy)
            await wait_for(lambda: _eq(cond(flappy, "NetworkUnreachable"), "False"), 10, "net up")
        # ... but the flapping itself quarantines the node once, and it stays quarantined
        await wait_for(lambda: is_tainted(flappy), 15, "flapping quarantine")
        n = await kube.get(NODES, flappy)
        assert n["metadata"]["annotations"]["fleetkeeper.io/health-types"] == "Flapping"
        plan.inject(flappy, parse_fault("net-down"))
        await wait_for(lambda: _eq(cond(flappy, "NetworkUnreachable"), "True"), 10, "net down")
        plan.clear(flappy)
        await wait_for(lambda: _eq(cond(flappy, "NetworkUnreachable"), "False"), 10, "net up")
        await asyncio.sleep(3)
        assert await is_tainted(flappy)
        assert registry.get_sample_value("fleetkeeper_remediation_actions_total",
                                         {"action": "quarantine", "result": "success"}) == 2  # flappy + held
        assert registry.get_sample_value("fleetkeeper_remediation_actions_total",
                                         {"action": "release", "result": "success"}) == 0

        # hold mode: a cleared condition returns the node only after the hold time
        await wait_for(lambda: is_tainted(held), 15, "ECC quarantine")
        plan.clear(held)
        await wait_for(lambda: _eq(cond(held, "GPUUnhealthy"), "False"), 10, "ECC cleared")
        await wait_for(lambda: _has_ann(kube, held, "fleetkeeper.io/health-cleared-at"), 10, "cleared mark")
        cleared_at = float((await kube.get(NODES, held))["metadata"]["annotations"]["fleetkeeper.io/health-cleared-at"])
        assert await is_tainted(held)

        async def released():
            return not await is_tainted(held)
        await wait_for(released, 20, "release after hold")
        # the controller's own mark says when the hold began: no release before it ran out
        assert time.time() >= cleared_at + 4.0
        n = await kube.get(NODES, held)
        assert not any(k.startswith("fleetkeeper.io/health-") and k != "fleetkeeper.io/health-history"
                       for k in n["metadata"]["annotations"])
    finally:
        await stop(task)


async def _eq(coro, want):
    return (await coro) == want


async def _has_ann(kube, name, key):
    n = await kube.get(NODES, name)
    return key in (n["metadata"].get("annotations") or {})


async def test_storm_cooldown_survives_a_restart(kube, cluster, own_nodes, tmp_path):
    nodes = await own_nodes(5)
    # a storm is 2 onsets within 3 s; the pause lasts an hour. After a restart the onsets are out of
    # the window, so only the recorded cooldown can keep the next fault from being acted on.
    policy = """
rules: [{type: GPUUnhealthy, reason: UncorrectableECC, remedy: reset, action: quarantine}]
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
storm: {min_nodes: 2, max_percent: 0, window: 3s, cooldown: 1h}
"""
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy)
    try:
        for n in nodes[:3]:
            plan.inject(n, parse_fault("ecc"))

        async def storm_on():
            return registry.get_sample_value("fleetkeeper_remediation_storm_active") == 1
        await wait_for(storm_on, 20, "the storm detected")
        cm = await kube.get(CONFIGMAPS, STATE_CONFIGMAP, "default")
        assert float(cm["data"][STORM_UNTIL_KEY]) > time.time() + 3000

        await stop(task)
        await asyncio.sleep(4.0)  # the onsets leave the 3 s window
        mgr2, plan, registry2, task = await start(kube, tmp_path, own_nodes.group, policy)
        async def storm_on2():  # read back before the first reconcile
            return registry2.get_sample_value("fleetkeeper_remediation_storm_active") == 1
        await wait_for(storm_on2, 20, "the cooldown carried over")
        plan.inject(nodes[4], parse_fault("ecc"))

        async def paused_event():
            return any(e["reason"] == "RemediationPaused" for e in await events_for(kube, nodes[4]))
        await wait_for(paused_event, 20, "the new fault paused by the carried-over cooldown")
        assert taint(await kube.get(NODES, nodes[4]), "fleetkeeper.io/quarantine") is None
        assert registry2.get_sample_value("fleetkeeper_remediation_actions_total",
                                          {"action": "quarantine", "result": "success"}) == 0
        # and the operator sees the pause
        pol = tmp_path / "policy.yaml"
        pol.write_text(policy)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkeeper", "health", "status", "--kubeconfig", str(cluster.kubeconfig),
            "--namespace", "default", "--policy", str(pol), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "fault storm: new quarantines paused for another" in out.decode(), out.decode()
    finally:
        await stop(task)
        await _delete_state(kube)


async def test_flap_history_survives_a_restart(kube, own_nodes, tmp_path):
    (flappy,) = await own_nodes(1)
    policy = """
rules: [{type: NetworkUnreachable, remedy: investigate, action: quarantine, trigger_after: 60s, clear_after: 1s}]
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
flapping: {transitions: 4, window: 10m}
storm: {min_nodes: 50}
"""

    async def cond():
        n = await kube.get(NODES, flappy)
        return next((c["status"] for c in n["status"]["conditions"] if c["type"] == "NetworkUnreachable"), None)

    async def flap(plan):
        plan.inject(flappy, parse_fault("net-down"))
        await wait_for(lambda: _eq(cond(), "True"), 10, "net down")
        plan.clear(flappy)
        await wait_for(lambda: _eq(cond(), "False"), 10, "net up")

    # the node's agent has reported healthy before (a simulated agent's first healthy write waits up to 30 s)
    await AgentCore(ConditionWriter(kube), RealClock(), startup_spread=0).observe(
        flappy, simulated_findings(flappy, [], 8))
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy, state_interval=0.5)
    try:
        await wait_for(lambda: _eq(cond(), "False"), 10, "the agent's first report")
        await flap(plan)  # two transitions before the restart

        async def recorded():
            cm = await kube.get_or_none(CONFIGMAPS, STATE_CONFIGMAP, "default")
            return len(json.loads(((cm or {}).get("data") or {}).get(FLAPS_KEY) or "{}").get(flappy, [])) == 2
        await wait_for(recorded, 10, "the transitions recorded")
        await stop(task)
        mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy, state_interval=0.5)
        await flap(plan)  # two more after it: four within the window, so the node is flapping
        try:
            await wait_for(lambda: _has_taint(kube, flappy), 15, "the flapping quarantine")
        except AssertionError as exc:  # say what the restarted controller knew
            n = await kube.get(NODES, flappy)
            raise AssertionError(f"{exc}; transitions held: {mgr.health.flaps.export(time.time(), 600, 10)}; "
                                 f"conditions: {[(c['type'], c['status'], c.get('lastTransitionTime')) for c in n['status']['conditions']]}") from None
        n = await kube.get(NODES, flappy)
        assert n["metadata"]["annotations"]["fleetkeeper.io/health-types"] == "Flapping"
    finally:
        await stop(task)
        await _delete_state(kube)


async def _has_taint(kube, name):
    return taint(await kube.get(NODES, name), "fleetkeeper.io/quarantine") is not None


# --- the Helm chart's identities ----------------------------------------------------------
# The chart's RBAC for health is enough and no more: the remediation controller runs as its
# ServiceAccount (leader Lease, quarantine, eviction, termination, Events, state ConfigMap)
# and an agent writes its node's conditions as the agent's ServiceAccount; every request is
# recorded, none is forbidden, and each rule is the only one that allowed one of them.
NS = "fleetkeeper-system"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "chart"))


async def test_chart_rbac_is_enough_and_each_rule_needed(kube, own_nodes, tmp_path):
    from rbac_audit import apply_rbac, audit, chart_docs, service_account

    docs = chart_docs()
    await apply_rbac(kube, docs)

    ecc_node, gone_node = await own_nodes(2)
    ns = f"rbac-{own_nodes.group}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "work", "namespace": ns},
                             "spec": {"nodeName": gone_node, "terminationGracePeriodSeconds": 1,
                                      "containers": [{"name": "c", "image": "busybox"}]}}, ns)

    controller = service_account(kube, "fleetkeeper-health")
    agent_kube = service_account(kube, "fleetkeeper-health-agent")
    mgr = Manager(controller, RuntimeSettings(namespace=NS, server={"port": 0},
                                              leader_election={"enabled": True, "lease_name": "fleetkeeper-health"}),
                  registry=CollectorRegistry())
    policy = f"""
budget: {{cluster: {{max_nodes: 10}}, zone: {{max_percent: 100}}, rack: {{max_nodes: 10}}}}
storm: {{min_nodes: 50}}
node_selector: {{{GROUP}: '{own_nodes.group}'}}
"""
    load_policy(policy)  # valid
    # the policy comes from the ConfigMap the chart makes (read by name), as in a cluster
    await kube.apply(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "fleetkeeper-health", "namespace": NS},
                                  "data": {"policy.yaml": policy}})
    await setup(mgr, HealthOptions(simulate=False, state_interval=0.5, reload_interval=0.5))
    task = asyncio.create_task(mgr.run())
    agent = AgentCore(ConditionWriter(agent_kube), RealClock(), startup_spread=0)
    try:
        await mgr.wait_synced(60)
        for n in (ecc_node, gone_node):
            assert await agent.observe(n, simulated_findings(n, [], 8))
        await asyncio.sleep(1.0)
        assert await agent.observe(ecc_node, simulated_findings(ecc_node, [parse_fault("ecc")], 8))
        assert await agent.observe(gone_node, simulated_findings(gone_node, [parse_fault("gpu-missing")], 8))

        async def ecc_quarantined():
            return taint(await kube.get(NODES, ecc_node), "fleetkeeper.io/quarantine") is not None
        await wait_for(ecc_quarantined, 30, "the ECC node quarantined by the controller's identity")

        async def terminated():  # evicted its pod, then deleted the node (the local provider's terminate)
            return await kube.get_or_none(NODES, gone_node) is None
        await wait_for(terminated, 60, "the GPU-missing node drained and terminated")
        assert await kube.get_or_none(PODS, "work", ns) is None
        # the machine-action ledger, written under the controller's identity
        ledger = await kube.get(CONFIGMAPS, LEDGER_CONFIGMAP, NS)
        assert gone_node in ledger["data"]["actions"]
        # the agent's identity: list and watch only its own node, acknowledge an action request
        items, rv = await agent_kube.list(NODES, field_selector=f"metadata.name={ecc_node}")
        assert [i["metadata"]["name"] for i in items] == [ecc_node]
        async with contextlib.aclosing(agent_kube.watch(NODES, rv, field_selector=f"metadata.name={ecc_node}",
                                                        timeout_seconds=1)) as events:
            async for _typ, _obj in events:
                break
        await agent_kube.patch(NODES, ecc_node, {"metadata": {"annotations": {
            "fleetkeeper.io/action-result": Report("n", "failed", "rbac test", 0).dumps()}}})

        async def state_written():
            return await kube.get_or_none(CONFIGMAPS, STATE_CONFIGMAP, NS)
        await wait_for(state_written, 20, "the state ConfigMap")

        async def state_patched():  # a later write patches it (the first one created it)
            return any(c.verb == "patch" and c.name == STATE_CONFIGMAP for c in controller.calls)
        await wait_for(state_patched, 30, "the state ConfigMap updated")
        lease = await kube.get(LEASES, "fleetkeeper-health", NS)
        assert lease["spec"]["holderIdentity"] == mgr.identity
    finally:
        await stop(task)
        for res, name, n in ((CONFIGMAPS, STATE_CONFIGMAP, NS), (CONFIGMAPS, LEDGER_CONFIGMAP, NS),
                             (CONFIGMAPS, "fleetkeeper-health", NS), (LEASES, "fleetkeeper-health", NS),
                             (NAMESPACES, ns, None)):
            try:
                await kube.delete(res, name, n)
            except errors.NotFound:
                pass
    for sa, calls in (("fleetkeeper-health", controller.calls), ("fleetkeeper-health-agent", agent_kube.calls)):
        forbidden, unneeded = audit(docs, sa, calls)
        assert not forbidden, f"{sa} was refused: {forbidden}"
        assert not unneeded, f"{sa} has rules none of its requests needed: {unneeded}"


async def _delete_state(kube):
    """The state ConfigMap a test's controller wrote in "default", so the next test starts without it."""
    try:
        await kube.delete(CONFIGMAPS, STATE_CONFIGMAP, "default")
    except errors.NotFound:
        pass


async def test_a_burst_of_quarantines_gets_every_event_counted_none_dropped(kube, own_nodes, tmp_path):
    """20 faults at once, the health recorder allowed 2 Event writes a second (burst 2): every node is
    tainted and every quarantine still gets its Event (they wait in the sink, paced, instead of being
    dropped past the rate limit), and the drop counter stays at 0."""
    nodes = await own_nodes(20, racks=4)
    policy = """
budget: {cluster: {max_nodes: 40}, zone: {max_percent: 100}, rack: {max_nodes: 40}, max_new_per_window: 40}
storm: {min_nodes: 100}
"""
    mgr, plan, registry, task = await start(kube, tmp_path, own_nodes.group, policy)
    try:
        mgr.health.recorder.set_rate(2.0, 2)
        for n in nodes:
            plan.inject(n, parse_fault("ecc"))

        async def all_tainted():
            return all([taint(await kube.get(NODES, n), "fleetkeeper.io/quarantine") for n in nodes])
        await wait_for(all_tainted, 120, "every node quarantined")

        async def every_event():
            await mgr.flush_events(5)
            missing = []
            for n in nodes:
                if not any(e["reason"] == "Quarantined" and e.get("reportingController") == "fleetkeeper.io/health"
                           for e in await events_for(kube, n)):
                    missing.append(n)
            return not missing or None
        await wait_for(every_event, 120, "a Quarantined Event on every node")
        assert registry.get_sample_value("fleetkeeper_events_total", {"reason": "Quarantined", "type": "Warning"}) \
            == len(nodes)
        dropped = [s for m in registry.collect() for s in m.samples
                   if s.name == "fleetkeeper_events_dropped_total" and s.value]
        assert dropped == []
    finally:
        await stop(task)
