"""CPU pools: balloons yield to pending CPU work as a unit, as GPU pools do (real scheduler, default
settings apart from the private pool). The work may not preempt (``preemptionPolicy: Never``, like
the periodic re-test pods), so only fleetkeeper's release can give it the room: without it the gang
stays Pending."""

from __future__ import annotations

from capacity_helpers import NAMES, bound, delete_jobs, pods_of, wait_for
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.core import errors
from fleetkeeper.core.kube import EVENTS, JOBS, PRIORITYCLASSES


async def test_a_cpu_gang_gets_the_cpu_balloons_it_needs_released_in_one_step(kube, namespace, pool_factory,
                                                                            run_capacity):
    pool = await pool_factory(3)
    pc = f"fk-balloon-{pool.pool}"
    cfg = CapacityConfig.model_validate({
        "balloons": {"namespace": namespace, "priority_class": pc, "tolerations": [pool.toleration],
                     "pools": [{"name": pool.pool, "resource": "cpu", "max_nodes": 3}]},
        "gangs": {"webhook_port": 0},
    })
    await run_capacity(cfg, namespace)
    work_pc = f"fk-no-preempt-{pool.pool}"
    await kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                        "metadata": {"name": work_pc}, "value": 0, "preemptionPolicy": "Never"})
    try:
        async def balloons_everywhere():
            return len(bound(await pods_of(kube, namespace, f"{NAMES.balloon}={pool.pool}"))) == 3
        await wait_for(balloons_everywhere, 90, what="a CPU balloon on each of the 3 nodes")
        spec = {**pool.pod_spec(), "priorityClassName": work_pc}
        spec["containers"] = [{"name": "etl", "image": "etl:latest",
                               "resources": {"requests": {"cpu": "50"}, "limits": {"cpu": "50"}}}]
        await kube.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "etl"},
                                 "spec": {"parallelism": 3, "completions": 3, "backoffLimit": 0,
                                          "template": {"metadata": {"labels": {NAMES.gang: "etl"}},
                                                       "spec": {**spec, "restartPolicy": "Never"}}}}, namespace)

        async def placed():
            return len(bound(await pods_of(kube, namespace, f"{NAMES.gang}=etl"))) == 3
        await wait_for(placed, 120, what="the CPU gang placed whole")
        async def released():  # Events are written by the recorder's sink, after the action
            events, _ = await kube.list(EVENTS, namespace)
            notes = [e.get("note", "") for e in events if e.get("reason") == "BalloonsReleased"]
            return notes if any("3 balloon(s)" in n and f"gang {namespace}/etl" in n and "CPU millicores" in n
                                for n in notes) else None
        await wait_for(released, 60, what="the BalloonsReleased Event for the CPU gang")
    finally:
        await delete_jobs(kube, namespace)
        for name in (pc, work_pc):
            try:
                await kube.delete(PRIORITYCLASSES, name)
            except errors.NotFound:
                pass
