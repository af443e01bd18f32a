"""Balloons and gangs together, default settings, on the real scheduler: a
burst of training jobs of mixed sizes on a small pool full of balloons. Every
job runs whole and finishes; none stalls; the largest job, which needs the
whole pool, is not starved: its room is reserved once it has waited past
the threshold, and no smaller job takes that room before it starts."""

from __future__ import annotations

from capacity_helpers import NAMES, balloons_on_every_node, delete_jobs, wait_for
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity import reserve as rs
from fleetkeeper.core.events import flush_all
from fleetkeeper.core.kube import EVENTS, JOBS, NODES, PODS, PRIORITYCLASSES
from fleetkeeper.core.views import parse_time

NODES_N = 6
SIM_RESULT, SIM_DELAY = "fleetkeeper.io/sim-result", "fleetkeeper.io/sim-delay"
# small jobs keep the pool busy, the largest (the whole pool) arrives among them, more small ones follow
SIZES = [2, 3, 1, 2, 6, 2, 3, 1, 4, 2, 3, 1, 2, 2, 1, 3]
LARGEST = 4
RESERVE_AFTER = 15
IN_FLIGHT_S = 5.0  # a bind already decided when the reservation taints landed


def cfg(pool, namespace: str, gangs_reserve: float | None = RESERVE_AFTER, **balloons) -> CapacityConfig:
    """The default configuration; only what a private pool in a shared test cluster needs is set (and a
    reservation threshold that suits jobs of seconds)."""
    return CapacityConfig.model_validate({
        "balloons": {"namespace": namespace, "priority_class": f"fk-balloon-{pool.pool}",
                     "tolerations": [pool.toleration],
                     "pools": [{"name": pool.pool, "resource": "gpu", "max_nodes": NODES_N}], **balloons},
        "gangs": {"webhook_port": 0, "reserve_after_seconds": gangs_reserve},
    })


def job(name: str, size: int, spec: dict, seconds: int) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"parallelism": size, "completions": size, "backoffLimit": 0,
                     "template": {"metadata": {"labels": {"burst": "1", NAMES.gang: name},
                                               "annotations": {SIM_RESULT: "succeed", SIM_DELAY: f"{seconds}s"}},
                                  "spec": {**spec, "restartPolicy": "Never"}}}}


async def run_burst(kube, namespace, pool, registry) -> dict:
    spec = pool.pod_spec()
    await balloons_on_every_node(kube, namespace, pool.pool, NODES_N)
    for i, size in enumerate(SIZES):
        await kube.create(JOBS, job(f"job-{i}-{size}", size, spec, 6), namespace)

    async def all_done():
        items, _ = await kube.list(JOBS, namespace)
        done = {j["metadata"]["name"]: (j.get("status") or {}).get("succeeded", 0) for j in items}
        return done if all(done.get(f"job-{i}-{s}") == s for i, s in enumerate(SIZES)) else None

    async def progress():
        items, _ = await kube.list(JOBS, namespace)
        pods, _ = await kube.list(PODS, namespace, label_selector="burst=1")
        return {j["metadata"]["name"]: ((j.get("status") or {}).get("succeeded", 0),
                                       sum(1 for p in pods if p["metadata"]["labels"].get(NAMES.gang)
                                           == j["metadata"]["name"] and p["spec"].get("nodeName")))
                for j in items}
    try:
        return await wait_for(all_done, 360, interval=2, what="every job of the burst finished")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (succeeded, bound) per job: {await progress()}") from None


async def test_burst_of_gangs_on_a_pool_of_balloons_never_stalls(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(NODES_N)
    _, registry = await run_capacity(cfg(pool, namespace), namespace)
    try:
        await run_burst(kube, namespace, pool, registry)
        # every job was placed whole; the largest was not left for last
        pods, _ = await kube.list(PODS, namespace, label_selector="burst=1")
        starts: dict[str, float] = {}
        for p in pods:
            c = next(c for c in p["status"]["conditions"] if c["type"] == "PodScheduled")
            job_name = p["metadata"]["labels"][NAMES.gang]
            t = parse_time(c["lastTransitionTime"])
            starts[job_name] = min(starts.get(job_name, t), t)
        order = [j for _, j in sorted((t, j) for j, t in starts.items())]
        largest = f"job-{LARGEST}-{SIZES[LARGEST]}"
        await flush_all(60)  # Events are written by the recorders' sinks, after the action
        events, _ = await kube.list(EVENTS, namespace)
        reserved = [e for e in events if e.get("reason") == "GangRoomReserved"]
        mine = [e for e in reserved if f"gang {largest} " in e.get("note", "")]
        assert mine, [e.get("note") for e in reserved]
        # once its room was reserved, no smaller job took it before the largest started: a job that started
        # in between could only be one the scheduler had already placed as the taints landed
        at = min(parse_time(e.get("eventTime") or e["metadata"]["creationTimestamp"]) for e in mine)
        late = {j: round(t - at, 1) for j, t in starts.items()
                if j != largest and at + IN_FLIGHT_S < t < starts[largest]}
        assert not late, f"jobs started on the largest job's reserved room after its reservation: {late}; {order}"
        # the reservation taints were written through the core applier
        assert (registry.get_sample_value("fleetkeeper_node_writes_total",
                                          {"component": "capacity", "action": "reserve", "result": "success"})
                or 0) >= 1
        # reservations are gone once the gang is placed
        nodes, _ = await kube.list(NODES, label_selector=f"{NAMES.pool}={pool.pool}")
        assert not [n for n in nodes if any(t["key"] == rs.reserved_key(NAMES) for t in n["spec"].get("taints") or ())]
        # balloons come back once nothing waits
        await balloons_on_every_node(kube, namespace, pool.pool, NODES_N,
                                     what="balloons back on every node after the burst")
    finally:
        await delete_jobs(kube, namespace)
        try:
            await kube.delete(PRIORITYCLASSES, f"fk-balloon-{pool.pool}")
        except Exception:
            pass
