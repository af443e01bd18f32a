"""The health scenario of ``make demo``: faults of each family on simulated
nodes, the ladder reacting, then a burst of faults that runs into the budget.

The scenario is sized from the policy and the fleet (:func:`sizes`), so that
what it shows is decided by the product's rules, not by timing: the ladder's
faults fit in the disruption budget, and the burst is larger than what is
left of the budget but stays below the fault-storm threshold (a storm pause
is a different guard: above the threshold, it, not the budget, would hold the
burst back, and only if the detector happened to see the burst at once).
"""

from __future__ import annotations

import asyncio
import time

from fleetkeeper.core import errors
from dataclasses import dataclass

from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.faults import FaultPlan, default_fault_file, parse_fault
from fleetkeeper.core.kube import NAMESPACES, NODES, PODS
from fleetkeeper.core.outcome import Outcome
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.core.views import default_projector
from fleetkeeper.health.agent import AgentCore, ConditionWriter, SimulatedFleet
from fleetkeeper.health.decide import selected, storm_threshold
from fleetkeeper.health.policy import Policy, load_policy

NS = "health-demo"
CONFIGMAP, POLICY_KEY = "fleetkeeper-health", "policy.yaml"  # the controller's own policy source
CASES = [("xid:79", "Xid 79, GPU fell off the bus"), ("ecc", "uncorrectable ECC"),
         ("disk-ro", "read-only filesystem"), ("maintenance:reboot", "Azure scheduled reboot")]
WAITING = 8  # burst nodes beyond the budget's headroom: the ones shown waiting


@dataclass(frozen=True)
class Sizes:
    cases: int  # ladder faults shown (each quarantined within the budget)
    burst: int  # further faulty nodes at once
    headroom: int  # budget units left for the burst
    limit: int | None  # the cluster budget
    threshold: int  # the fault-storm threshold

    @property
    def why(self) -> str:
        return (f"cluster budget {self.limit}, storm threshold {self.threshold}: {self.cases} ladder fault(s), "
                f"then {self.burst} at once ({self.headroom} budget unit(s) left for them)")


def sizes(total: int, spare: int, policy: Policy) -> Sizes | None:
    """How many ladder faults and how large a burst this fleet shows (pure). ``total``: the nodes the
    policy manages; ``spare``: healthy GPU nodes the scenario may fault. None when the fleet is too
    small to show a burst held back by the budget."""
    limit = policy.budget.cluster.limit(total)
    threshold = storm_threshold(total, policy)
    cases = min(len(CASES), spare, limit if limit is not None else len(CASES))
    headroom = (limit - cases) if limit is not None else spare
    # faulted nodes within the storm window stay below the threshold, and the burst outgrows the headroom
    burst = min(headroom + WAITING, spare - cases, threshold - 1 - cases)
    if cases < 1 or limit is None or burst <= headroom:
        return None
    return Sizes(cases, burst, headroom, limit, threshold)


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
    policy = await ConfigMapKey(kube, RuntimeSettings().namespace, CONFIGMAP, POLICY_KEY, load_policy).load()
    everything, _ = await kube.list(NODES)
    total = sum(1 for n in everything if selected(proj.node(n), policy))
    size = sizes(total, len(gpu), policy)
    if size is None:
        ctx.report(f"{len(gpu)} untainted GPU nodes of {total}: too few to show a burst held back by the "
                   "budget; skipped")
        return Outcome.skip("too few untainted GPU nodes for the budget and storm threshold")
    ctx.report(f"sized for {total} nodes: {size.why}")
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
        cases = CASES[:size.cases]
        victims = spread[:len(cases)]
        xid = victims[0]  # CASES starts with Xid 79: the case with pods to evict
        for i in range(2):
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": f"trainer-{i}", "namespace": NS},
                                     "spec": {"nodeName": xid.name, "terminationGracePeriodSeconds": 1,
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
        ok = outcome.expect(await _wait(all_tainted, 30), f"each of the {len(cases)} ladder fault(s) ends in a quarantine taint")
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
            ctx.report(f"pods on {xid.name} evicted through the Eviction API (Xid 79 needs a reboot)")

        storm = spread[len(cases):len(cases) + size.burst]
        for v in storm:
            plan.inject(v.name, parse_fault("ecc"))
            touched.append(v.name)
        ctx.report(f"burst: uncorrectable ECC on {len(storm)} more nodes at once ({len(cases) + len(storm)} "
                   f"faulty nodes in all, below the storm threshold of {size.threshold})")

        async def exhausted() -> bool:
            return (ctx.registry.get_sample_value("fleetkeeper_remediation_budget_exhausted",
                                                  {"scope": "cluster"}) or 0) >= 1
        # the budget runs out once the headroom's quarantines are written, and admissions are taken one at a
        # time: the wait grows with the headroom (46 units at 7,500 nodes, 1-2 at 200)
        hit = await _wait(exhausted, 20 + 2 * size.headroom)
        await asyncio.sleep(2)
        got = await asyncio.gather(*(kube.get(NODES, v.name) for v in storm))
        tainted = sum(1 for n in got if any(t["key"] == names.quarantine for t in n["spec"].get("taints") or []))
        ratio = ctx.registry.get_sample_value("fleetkeeper_remediation_budget_used_ratio", {"scope": "cluster"})
        storm_on = ctx.registry.get_sample_value("fleetkeeper_remediation_storm_active") or 0
        outcome.expect(hit and tainted <= size.headroom, "the budget holds back the burst beyond what is left of it",
                       f"{tainted}/{len(storm)} acted on, {size.headroom} budget unit(s) left, exhausted={int(hit)}")
        outcome.expect(not storm_on, "no fault-storm pause below the storm threshold", "storm cooldown active")
        ctx.report(f"budget: {tainted} of the burst's {len(storm)} nodes acted on (the {size.headroom} unit(s) "
                   f"left of the budget of {size.limit}), {len(storm) - tainted} wait; "
                   f"fleetkeeper_remediation_budget_exhausted{{scope=cluster}}={1 if hit else 0}, "
                   f"used ratio {ratio}; storm cooldown active={int(storm_on)}")
    finally:
        plan.clear()
        # let the agents write the cleared conditions, then return the nodes for the next scenarios
        await asyncio.sleep(2.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

        async def restore(name: str) -> None:
            try:
                n = await kube.get(NODES, name)
                taints = [t for t in n["spec"].get("taints") or [] if t["key"] != names.quarantine]
                ann = {k: None for k in (n["metadata"].get("annotations") or {})
                       if k.startswith(f"{names.domain}/health-") and not k.endswith("history")}
                await kube.patch(NODES, name, {"metadata": {"annotations": ann}, "spec": {"taints": taints or None}})
            except errors.FleetkeeperError:
                pass
        await asyncio.gather(*(restore(name) for name in touched))  # one round trip's time, not 58 in a row
        try:
            await kube.delete(NAMESPACES, NS)
        except errors.FleetkeeperError:
            pass
        ctx.report(f"faults cleared; {len(touched)} demo nodes returned to service")
    return outcome
