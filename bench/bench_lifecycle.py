"""API writes per remediated node, through the whole lifecycle, on a real control plane.

  .venv/bin/python bench/bench_lifecycle.py [--nodes 60] [--victims 10] [--pods 4]

K victim nodes, each running P pods, report an uncorrectable ECC
error (the reset ladder: quarantine, drain), then the error clears: health hands
the node to the preflight gate, the gate's simulated test passes, the node is
back in service. Health and preflight (and the lifecycle controller where it
exists) run in one manager; the agents write through their own client.

Counted from the manager's own client (``fleetkeeper_api_requests_total``):
node writes, evictions, Events and test pods, per remediated node. Goal: node
writes + evictions <= P + 3.

The same script runs against another source tree for a before/after figure:
  PYTHONPATH=/path/to/other/src .venv/bin/python bench/bench_lifecycle.py
"""

from __future__ import annotations

import argparse
import asyncio
import time

from prometheus_client import CollectorRegistry

import fleetkeeper
from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.faults import parse_fault
from fleetkeeper.core.kube import PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.agent import AgentCore, ConditionWriter, simulated_findings
from fleetkeeper.health.controller import HealthOptions
from fleetkeeper.health.controller import setup as health_setup
from fleetkeeper.health.policy import Policy
from fleetkeeper.preflight.config import load_config
from fleetkeeper.preflight.controller import setup as preflight_setup

from common import local_cluster  # bench/ helper

NS = "default"


def requests(reg: CollectorRegistry) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for m in reg.collect():
        if m.name == "fleetkeeper_api_requests":
            for s in m.samples:
                if s.name.endswith("_total"):
                    k = (s.labels.get("verb", "?"), s.labels.get("resource", "?"))
                    out[k] = out.get(k, 0.0) + s.value
    return out


async def wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred():
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


async def main(total: int, victims_n: int, pods_per: int) -> None:
    print(f"source: {fleetkeeper.__file__}", flush=True)
    async with local_cluster(total, "fk-bench-lifecycle-") as lc:
        kube = await lc.connect()
        agents_kube = await lc.connect()
        reg = CollectorRegistry()
        mgr = Manager(kube, RuntimeSettings(namespace=NS, server={"port": 0}, leader_election={"enabled": False}),
                      registry=reg)
        policy = Policy.model_validate({
            "rules": [{"type": "GPUUnhealthy", "reason": "UncorrectableECC", "remedy": "reset", "action": "drain",
                       "clear_after": "1s"}],
            "budget": {"cluster": {"max_nodes": 2 * victims_n}, "zone": {"max_percent": 100},
                       "rack": {"max_nodes": 2 * victims_n}},
            "return_to_service": {"mode": "preflight"}, "storm": {"min_nodes": 10 * victims_n}})
        await health_setup(mgr, HealthOptions(policy=policy, simulate=False))
        await preflight_setup(mgr, load_config({"periodic": {"enabled": False}, "gate": {"retry_backoff_s": 1}},
                                               "bench"))
        try:
            from fleetkeeper.lifecycle.controller import setup as lifecycle_setup  # after the refactor only

            await lifecycle_setup(mgr, None)
            with_lifecycle = True
        except ImportError:
            with_lifecycle = False
        task = asyncio.create_task(mgr.run())
        await mgr.wait_synced(600)
        names = mgr.names
        nodes = mgr.node_informer()
        await wait(lambda: _async(all(not n.taints for n in nodes.items() if n.labels.get("type") == "kwok")),
                   300, "nodes settled")
        victims = sorted(n.name for n in nodes.items() if n.gpus and n.labels.get("type") == "kwok")[:victims_n]
        if len(victims) < victims_n:
            raise SystemExit(f"only {len(victims)} GPU nodes; need {victims_n} (raise --nodes)")
        for v in victims:
            for i in range(pods_per):
                await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": f"work-{v}-{i}"[:63], "namespace": NS},
                                         "spec": {"nodeName": v, "terminationGracePeriodSeconds": 0,
                                                  "containers": [{"name": "c", "image": "busybox"}]}}, NS)
        pods = mgr.pod_informer()

        async def running():
            return sum(1 for p in pods.items() if p.node in set(victims) and p.phase == "Running") == \
                victims_n * pods_per
        await wait(running, 120, "work pods Running")
        core = AgentCore(ConditionWriter(agents_kube), RealClock(), heartbeat=300)
        ok = simulated_findings("x", [], 8)
        bad = simulated_findings("x", [parse_fault("ecc")], 8)
        for v in victims:
            await core.observe(v, ok)
        await asyncio.sleep(3)
        before = requests(reg)
        t0 = time.monotonic()
        for v in victims:
            await core.observe(v, bad)

        async def drained():
            return not any(p.node in set(victims) and not p.deleting for p in pods.items()
                           if p.namespace == NS and p.name.startswith("work-"))
        await wait(drained, 300, "victims drained")
        for v in victims:
            await core.observe(v, ok)

        async def back():
            return all((n := nodes.get(v)) is not None and n.taint(names.quarantine) is None
                       and n.taint(names.preflight) is None and names.preflight not in n.labels for v in victims)
        await wait(back, 600, "victims back in service")
        span = time.monotonic() - t0
        await asyncio.sleep(5)  # the Events that follow
        after = requests(reg)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}
        node_writes = sum(v for (verb, res), v in d.items() if res == "nodes" and verb in ("patch", "update"))
        node_gets = sum(v for (verb, res), v in d.items() if res == "nodes" and verb == "get")
        evictions = sum(v for (verb, res), v in d.items() if verb == "evict")
        events = sum(v for (verb, res), v in d.items() if res == "events" and verb in ("create", "patch"))
        pod_writes = sum(v for (verb, res), v in d.items() if res == "pods" and verb in ("create", "delete"))
        k = victims_n
        print(f"{k} nodes x {pods_per} pods remediated end to end in {span:.1f}s "
              f"({'with' if with_lifecycle else 'without'} the lifecycle controller)")
        print(f"per remediated node: {node_writes / k:.2f} node writes + {evictions / k:.2f} evictions = "
              f"{(node_writes + evictions) / k:.2f} (goal <= {pods_per + 3}); also {node_gets / k:.2f} node GETs, "
              f"{events / k:.2f} Event writes, {pod_writes / k:.2f} test-pod writes")
        by_action = {}
        for m in reg.collect():
            if m.name == "fleetkeeper_node_writes":
                for smp in m.samples:
                    if smp.name.endswith("_total") and smp.value:
                        by_action[f"{smp.labels['component']}/{smp.labels['action']}/{smp.labels['result']}"] = smp.value
        if by_action:
            print("node writes by component/action/result: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(
                by_action.items())))
        print("all requests: " + ", ".join(f"{verb} {res} {v:.0f}" for (verb, res), v in sorted(d.items())))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()
        await agents_kube.close()


async def _async(v):
    return v


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=60)
    ap.add_argument("--victims", type=int, default=10)
    ap.add_argument("--pods", type=int, default=4)
    a = ap.parse_args()
    asyncio.run(main(a.nodes, a.victims, a.pods))
