"""The health scenario of ``make demo``: faults of each family on simulated
nodes, the ladder reacting, then a storm that runs into the budget."""

from __future__ import annotations

import asyncio
import time

from fleetkeeper.core import errors
from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.faults import FaultPlan, default_fault_file, parse_fault
from fleetkeeper.core.kube import NAMESPACES, NODES, PODS
from fleetkeeper.core.outcome import Outcome
from fleetkeeper.core.views import default_projector
from fleetkeeper.health.agent import AgentCore, ConditionWriter, SimulatedFleet

NS = "health-demo"


async def _wait(fn, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await fn():
            return True
        await asyncio.sleep(0.5)
    return False


async def demo(ctx) -> Outcome:
    kube, names = ctx.kube, ctx.names
    outcome = Outcome()
    proj = default_projector(names.domain)
    views = [proj.node(n) for n in (await kube.list(NODES, label_selector="type=kwok"))[0]]
    gpu = [v for v in views if v.gpus and not v.taints]
    if len(gpu) < 20:
        ctx.report("not enough untainted GPU nodes for the health scenario; skipped")
        return Outcome.skip("fewer than 20 untainted GPU nodes")
    # one node per rack where possible, so the per-rack budget does not hide the ladder
    by_rack: dict[str, list] = {}
    for v in gpu:
        by_rack.setdefault(v.labels.get(names.rack, ""), []).append(v)
    spread = [lst[0] for lst in by_rack.values()] + [v for lst in by_rack.values() for v in lst[1:]]
    plan = FaultPlan(default_fault_file())
    plan.clear()
    sim = SimulatedFleet(AgentCore(ConditionWriter(kube), RealClock(), heartbeat=300, startup_spread=300), plan,
                         lambda: [(v.name, v.gpus) for v in gpu], interval=1.0)
    task = asyncio.create_task(sim.run())
    touched: list[str] = []
    try:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    except errors.Conflict:
        pass
    try:
        cases = [("ecc", "uncorrectable ECC"), ("xid:79", "Xid 79, GPU fell off the bus"),
                 ("disk-ro", "read-only filesystem"), ("maintenance:reboot", "Azure scheduled reboot")]
        victims = spread[:len(cases)]
        for i in range(2):
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": f"trainer-{i}", "namespace": NS},
                                     "spec": {"nodeName": victims[1].name, "terminationGracePeriodSeconds": 1,
                                              "containers": [{"name": "c", "image": "trainer"}]}}, NS)
        t0 = time.monotonic()
        for v, (kind, what) in zip(victims, cases):
            plan.inject(v.name, parse_fault(kind))
            touched.append(v.name)
            ctx.report(f"fault {kind} ({what}) on {v.name}")

        async def all_tainted() -> bool:
            for v in victims:
                n = await kube.get(NODES, v.name)
                if not any(t["key"] == names.quarantine for t in n["spec"].get("taints") or []):
                    return False
            return True
        ok = outcome.expect(await _wait(all_tainted, 30), "each of the four faults ends in a quarantine taint")
        for v in victims:
            a = (await kube.get(NODES, v.name))["metadata"].get("annotations") or {}
            reason = a.get(names.domain + '/health-reason')
            if reason is None:
                ctx.report(f"{v.name}: not acted on yet (held back by the safety budget, or still being evaluated)")
                continue
            ctx.report(f"{v.name}: {'quarantined' if ok else 'not yet quarantined'}: "
                       f"{reason} -> {a.get(names.domain + '/health-action', '?')}"
                       f", fixable by {a.get(names.domain + '/health-remedy', '?')}")
        ctx.report(f"conditions to taints in {time.monotonic() - t0:.1f}s")

        async def evicted() -> bool:
            items, _ = await kube.list(PODS, NS)
            return all(p["metadata"].get("deletionTimestamp") for p in items)
        if outcome.expect(await _wait(evicted, 20), "the Xid 79 node's pods are evicted"):
            ctx.report(f"pods on {victims[1].name} evicted through the Eviction API (Xid 79 needs a reboot)")

        storm = spread[len(cases):len(cases) + 16]
        for v in storm:
            plan.inject(v.name, parse_fault("ecc"))
            touched.append(v.name)
        ctx.report(f"storm: uncorrectable ECC on {len(storm)} more nodes at once")

        async def exhausted() -> bool:
            return (ctx.registry.get_sample_value("fleetkeeper_remediation_budget_exhausted",
                                                  {"scope": "cluster"}) or 0) >= 1
        hit = await _wait(exhausted, 20)
        await asyncio.sleep(2)
        tainted = 0
        for v in storm:
            n = await kube.get(NODES, v.name)
            tainted += any(t["key"] == names.quarantine for t in n["spec"].get("taints") or [])
        ratio = ctx.registry.get_sample_value("fleetkeeper_remediation_budget_used_ratio", {"scope": "cluster"})
        storm_on = ctx.registry.get_sample_value("fleetkeeper_remediation_storm_active") or 0
        outcome.expect(hit and tainted < len(storm), "the budget holds back part of the storm",
                       f"{tainted}/{len(storm)} acted on")
        ctx.report(f"budget: {tainted} of the storm's {len(storm)} nodes acted on, {len(storm) - tainted} wait; "
                   f"fleetkeeper_remediation_budget_exhausted{{scope=cluster}}={1 if hit else 0}, "
                   f"used ratio {ratio}; storm cooldown active={int(storm_on)}")
    finally:
        plan.clear()
        # let the agents write the cleared conditions, then return the nodes for the next scenarios
        await asyncio.sleep(2.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for name in touched:
            try:
                n = await kube.get(NODES, name)
                taints = [t for t in n["spec"].get("taints") or [] if t["key"] != names.quarantine]
                ann = {k: None for k in (n["metadata"].get("annotations") or {})
                       if k.startswith(f"{names.domain}/health-") and not k.endswith("history")}
                await kube.patch(NODES, name, {"metadata": {"annotations": ann}, "spec": {"taints": taints or None}})
            except errors.FleetkeeperError:
                pass
        try:
            await kube.delete(NAMESPACES, NS)
        except errors.FleetkeeperError:
            pass
        ctx.report(f"faults cleared; {len(touched)} demo nodes returned to service")
    return outcome
