"""Balloons on the real scheduler: a pool full of balloons gives way at once to
a GPU job (a gang), the balloons come back when it ends, and balloons never
stay on a quarantined node."""

from __future__ import annotations


from capacity_helpers import NAMES, bound, pods_of, wait_for
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.explain import explain_node
from fleetkeeper.core.kube import DEPLOYMENTS, JOBS, NODES, PRIORITYCLASSES

NODES_N = 3


def cfg(pool, namespace: str) -> CapacityConfig:
    return CapacityConfig.model_validate({
        "balloons": {"namespace": namespace, "priority_class": f"fk-balloon-{pool.pool}", "evict_per_minute": 600,
                     "tolerations": [pool.toleration],
                     "pools": [{"name": pool.pool, "resource": "gpu", "max_nodes": NODES_N}]},
        "gangs": {"webhook_port": 0},
    })


async def test_job_preempts_balloons_and_balloons_return(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(NODES_N)
    cap, registry = await run_capacity(cfg(pool, namespace), namespace)
    sel = f"{NAMES.domain}/balloon={pool.pool}"
    try:
        async def full():
            pods = await pods_of(kube, namespace, sel)
            running = [p for p in pods if p["status"].get("phase") == "Running"]
            return running if len(running) == NODES_N else None
        running = await wait_for(full, 60, what="a balloon on every node")
        assert {p["spec"]["nodeName"] for p in running} == set(pool.nodes)  # one per node
        pod = running[0]
        assert pod["spec"]["priority"] < 0
        assert pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "8"
        dep = await kube.get(DEPLOYMENTS, f"balloon-{pool.pool}", namespace)
        assert dep["spec"]["replicas"] == NODES_N

        async def idle_full():
            return registry.get_sample_value("fleetkeeper_balloon_idle_capacity",
                                             {"pool": pool.pool, "resource": "nvidia.com/gpu"}) == 8 * NODES_N
        await wait_for(idle_full, 20, what="idle capacity metric = all GPUs")
        lines = await explain_node(kube, NAMES, running[0]["spec"]["nodeName"])
        assert any("holds this node warm" in line for line in lines), lines

        # a 2-node GPU job (a gang) arrives on the full pool
        spec = {**pool.pod_spec(), "restartPolicy": "Never"}
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
               "spec": {"parallelism": 2, "completions": 2, "backoffLimit": 0,
                        "template": {"metadata": {"labels": {"app": "train", NAMES.gang: "train"}}, "spec": spec}}}
        await kube.create(JOBS, job, namespace)

        async def job_placed():
            pods = await pods_of(kube, namespace, "app=train")
            return pods if len(bound(pods)) == 2 else None
        placed = await wait_for(job_placed, 60, what="the job placed by preempting balloons")
        job_nodes = {p["spec"]["nodeName"] for p in placed}
        assert job_nodes <= set(pool.nodes)

        async def balloons_made_room():
            pods = await pods_of(kube, namespace, sel)
            on = {p["spec"].get("nodeName") for p in bound(pods)}
            return not (on & job_nodes) and len(pods) == NODES_N
        await wait_for(balloons_made_room, 30, what="no balloon left on the job's nodes; preempted ones re-created")

        # the job ends (KWOK completes Job pods): the balloons come back on every node
        async def job_done():
            j = await kube.get(JOBS, "train", namespace)
            return (j.get("status") or {}).get("succeeded") == 2
        await wait_for(job_done, 60, what="the job to complete")
        await wait_for(full, 60, what="balloons back on every node after the job")
        await wait_for(idle_full, 20, what="idle capacity back to all GPUs")

        # quarantine a node: its balloon is removed and does not come back there
        victim = pool.nodes[0]
        await kube.patch(NODES, victim, {"spec": {"taints": [
            {"key": "fleetkeeper.io/e2e-capacity", "value": pool.toleration["value"], "effect": "NoSchedule"},
            {"key": NAMES.quarantine, "value": "xid-79", "effect": "NoSchedule"}]}})

        async def off_victim():
            pods = await pods_of(kube, namespace, sel)
            on = [p for p in bound(pods) if p["spec"]["nodeName"] == victim]
            return pods if not on and len(pods) == NODES_N else None
        pods = await wait_for(off_victim, 30, what="the balloon removed from the quarantined node")
        assert sum(1 for p in pods if not p["spec"].get("nodeName")) == 1  # it waits, Pending
        assert registry.get_sample_value("fleetkeeper_balloon_evictions_total",
                                         {"pool": pool.pool, "result": "ok"}) >= 1
        lines = await explain_node(kube, NAMES, victim)
        assert any("balloons may not use this node" in line for line in lines), lines
    finally:
        try:
            await kube.delete(PRIORITYCLASSES, f"fk-balloon-{pool.pool}")
        except Exception:
            pass


async def test_released_balloons_the_replicaset_leaves_are_evicted(cluster, kube, namespace, pool_factory,
                                                                   run_capacity):
    """Work waits on a pool full of balloons while kube-controller-manager (Deployment and ReplicaSet
    controllers) does not act: fleetkeeper holds the Deployment at the balloons it keeps, and the released
    ones, which no ReplicaSet removes, are evicted BALLOON_LINGER_SECONDS later, exactly as many as the
    work needs, each with a BalloonEvicted Event and counted; the work is then placed. The pods cannot
    preempt (``preemptionPolicy: Never``), so nothing else could have made their room."""
    import os
    import signal

    from fleetkeeper.core.kube import CORE_EVENTS, PODS

    pool = await pool_factory(NODES_N)
    pc = f"fk-nopreempt-{pool.pool}"
    await kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                        "metadata": {"name": pc}, "value": 0, "preemptionPolicy": "Never"})
    cap, registry = await run_capacity(cfg(pool, namespace), namespace)
    sel = f"{NAMES.domain}/balloon={pool.pool}"
    kcm = cluster.state.pids["kube-controller-manager"]
    try:
        async def full():
            pods = await pods_of(kube, namespace, sel)
            return len([p for p in pods if p["status"].get("phase") == "Running"]) == NODES_N
        await wait_for(full, 60, what="a balloon on every node")
        os.kill(kcm, signal.SIGSTOP)  # no Deployment or ReplicaSet controller from here
        try:
            for i in range(2):
                await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": f"work-{i}", "labels": {"app": "work"}},
                                         "spec": {**pool.pod_spec(), "restartPolicy": "Never",
                                                  "priorityClassName": pc}}, namespace)

            async def held():
                dep = await kube.get(DEPLOYMENTS, f"balloon-{pool.pool}", namespace)
                return dep["spec"]["replicas"] == NODES_N - 2
            await wait_for(held, 60, what="the balloon Deployment held at the one balloon kept")

            async def placed():
                pods = await pods_of(kube, namespace, "app=work")
                return pods if len(bound(pods)) == 2 else None
            work = await wait_for(placed, 90, what="the work placed once the lingering balloons are evicted")
        finally:
            os.kill(kcm, signal.SIGCONT)
        assert len({p["spec"]["nodeName"] for p in work}) == 2
        assert registry.get_sample_value("fleetkeeper_balloon_lingering_evictions_total",
                                         {"pool": pool.pool, "result": "ok"}) == 2  # as many as needed
        balloons = await pods_of(kube, namespace, sel)
        assert all(p["spec"].get("nodeName") not in {w["spec"]["nodeName"] for w in work}
                   for p in balloons if not p["metadata"].get("deletionTimestamp"))

        async def announced():
            evs, _ = await kube.list(CORE_EVENTS, namespace)
            return [e for e in evs if e.get("reason") == "BalloonEvicted"] or None
        evs = await wait_for(announced, 30, what="a BalloonEvicted Event per evicted balloon")
        assert len(evs) == 2 and all("not yet removed by its ReplicaSet" in e["message"] for e in evs), evs
    finally:
        for name in (f"fk-balloon-{pool.pool}", pc):
            try:
                await kube.delete(PRIORITYCLASSES, name)
            except Exception:
                pass
