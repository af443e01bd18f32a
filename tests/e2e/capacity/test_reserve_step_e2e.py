"""A starving gang's room is reserved in one step, on the real control plane.

Every node of a pool is busy with long-running work; a gang that needs the
whole pool arrives and waits past the threshold. With a budget of one
reservation step a minute, every node the gang needs carries its reservation
taint after that one step (before, the budget counted taints: one node a
minute, and at 1,000 nodes the reservation took longer than the wait it was
meant to end). The gang's members tolerate exactly that taint.
"""

from __future__ import annotations

from capacity_helpers import NAMES, delete_jobs, pods_of, wait_for
from fleetkeeper.capacity import reserve as rs
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.core.kube import JOBS, NODES, PODS

NODES_N = 5
BUSY = "e2e.fleetkeeper.io/busy"


def cfg(pool, namespace: str) -> CapacityConfig:
    return CapacityConfig.model_validate({
        "balloons": {"enabled": False, "namespace": namespace,
                     "pools": [{"name": pool.pool, "resource": "gpu", "max_nodes": NODES_N}]},
        "gangs": {"webhook_port": 0, "reserve_after_seconds": 3, "reserve_per_minute": 1},
    })


async def test_a_starving_gangs_whole_room_is_reserved_in_one_step(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(NODES_N)
    _, registry = await run_capacity(cfg(pool, namespace), namespace)
    spec = pool.pod_spec()
    try:
        for i in range(NODES_N):  # long-running work on every node (not a gang)
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": f"busy-{i}", "labels": {BUSY: "1"}},
                                     "spec": spec}, namespace)

        async def busy_everywhere():
            return sum(1 for p in await pods_of(kube, namespace, BUSY) if p["spec"].get("nodeName")) == NODES_N
        await wait_for(busy_everywhere, 60, what="work on every node of the pool")
        await kube.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "whole"},
                                 "spec": {"parallelism": NODES_N, "completions": NODES_N, "backoffLimit": 0,
                                          "template": {"metadata": {"labels": {NAMES.gang: "whole"}},
                                                       "spec": {**spec, "restartPolicy": "Never"}}}}, namespace)
        tok = rs.token(f"{namespace}/whole")
        key = rs.reserved_key(NAMES)

        def count(result: str) -> float:
            return registry.get_sample_value("fleetkeeper_node_reservations_total",
                                             {"op": "reserve", "result": result})

        async def reserved():
            nodes, _ = await kube.list(NODES, label_selector=f"{NAMES.pool}={pool.pool}")
            have = [n["metadata"]["name"] for n in nodes
                    if any(t["key"] == key and t.get("value") == tok for t in n["spec"].get("taints") or ())]
            # the taints are on the nodes and every write of them is counted (the count follows the write)
            return have if len(have) == NODES_N and count("ok") + count("error") >= NODES_N else None
        await wait_for(reserved, 120, what=f"all {NODES_N} nodes reserved for the gang")
        # one step of the budget covered the whole reservation: no taint of it waited for the rate limit
        # (with the budget counting taints, one a minute, the second node would wait a minute)
        assert count("rate_limited") == 0, (count("ok"), count("error"), count("rate_limited"))
        members = await pods_of(kube, namespace, f"{NAMES.gang}=whole")
        assert len(members) == NODES_N
        for p in members:
            assert any(t.get("key") == key and t.get("value") == tok for t in p["spec"].get("tolerations") or ())
            assert not p["spec"].get("nodeName")  # the work already there runs on: nothing new starts
    finally:
        await delete_jobs(kube, namespace)
