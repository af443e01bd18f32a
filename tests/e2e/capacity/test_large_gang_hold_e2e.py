"""A large gang reaches kube-scheduler only once it fits, on the real control plane.

Each failed pod group cycle of a large gang holds kube-scheduler's only
scheduling thread (a status PATCH per member, and the group is retried back to
back from the backoff queue while nothing else is queued), so smaller gangs
waited behind it on idle nodes (docs/capacity.md, "Large gangs"). fleetkeeper
withholds the PodGroup of a gang of at least ``hold_until_room_members`` until
its simulation places the gang whole, and its webhook admits every member with
a scheduling gate that it removes once the gang is no longer held (the
PodGroup follows when no gate is left): the scheduler never tries a held
member, and a sibling's arrival does not wake it.

Here: a pool of 4 nodes, one busy with long-running work; a 4-member gang
(held: it fits the pool, not now) and a 2-member gang behind it. The small
gang (below the threshold: its gate is removed at once) is placed; the large
one has a Workload but no PodGroup, every member still carries the gate, and
none was ever tried by the scheduler (no PodScheduled condition but the API
server's SchedulingGated). Once the busy node frees, the gates go, the
PodGroup is created and the gang is bound whole.
"""

from __future__ import annotations

import asyncio

from capacity_helpers import NAMES, bound, delete_jobs, gang_member, pods_of, wait_for, wait_gang_bound, wait_held
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.explain import explain_pod
from fleetkeeper.core import errors
from fleetkeeper.core.kube import JOBS, PODGROUPS, PODS, WORKLOADS, build_request

NODES_N = 4
BUSY = "e2e.fleetkeeper.io/busy"


def cfg(pool, namespace: str) -> CapacityConfig:
    return CapacityConfig.model_validate({
        "balloons": {"enabled": False, "namespace": namespace,
                     "pools": [{"name": pool.pool, "resource": "gpu", "max_nodes": NODES_N}]},
        "gangs": {"webhook_port": 0, "hold_until_room_members": 3, "reserve_after_seconds": None},
    })


def gang_job(name: str, size: int, spec: dict) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"parallelism": size, "completions": size, "backoffLimit": 0,
                     "template": {"metadata": {"labels": {NAMES.gang: name}},
                                  "spec": {**spec, "restartPolicy": "Never"}}}}


def tried(pod: dict) -> bool:
    return any(c.get("type") == "PodScheduled" and c.get("reason") != "SchedulingGated"
               for c in (pod.get("status") or {}).get("conditions") or ())


def gated(pod: dict) -> bool:
    return any(g.get("name") == NAMES.gang_gate for g in pod["spec"].get("schedulingGates") or ())


async def test_a_large_gang_gets_its_podgroup_only_once_it_fits(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(NODES_N)
    await run_capacity(cfg(pool, namespace), namespace)
    spec = pool.pod_spec()
    try:
        await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                 "metadata": {"name": "busy", "labels": {BUSY: "1"}}, "spec": spec}, namespace)

        async def busy_bound():
            return bool(bound(await pods_of(kube, namespace, BUSY)))
        await wait_for(busy_bound, 60, what="long-running work on one node")
        await kube.create(JOBS, gang_job("large", NODES_N, spec), namespace)
        await kube.create(JOBS, gang_job("small", 2, spec), namespace)

        async def small_placed():
            return len(bound(await pods_of(kube, namespace, f"{NAMES.gang}=small"))) == 2
        await wait_for(small_placed, 90, what="the small gang placed while the large one waits")

        async def large_judged():
            # its Workload is there (the gang is complete, so the pool's simulation judges it) and every
            # member exists
            wl = await kube.get_or_none(WORKLOADS, "large", namespace)
            return wl is not None and len(await pods_of(kube, namespace, f"{NAMES.gang}=large")) == NODES_N
        await wait_for(large_judged, 60, what="the large gang's Workload and all its members")
        await asyncio.sleep(5.0)  # several balloon passes: a wrong verdict would create the PodGroup now
        assert await kube.get_or_none(PODGROUPS, "large", namespace) is None, \
            "the large gang's PodGroup was created although the gang does not fit now"
        members = await pods_of(kube, namespace, f"{NAMES.gang}=large")
        assert not bound(members)
        assert all(gated(p) for p in members), "a held gang's members carry fleetkeeper's gate"
        assert not any(tried(p) for p in members), \
            "kube-scheduler tried members of the held gang: " + str([p["status"].get("conditions") for p in members])
        # explain tells why, in fleetkeeper's words (there is no PodGroup for the scheduler to speak on)
        text = "\n".join(await explain_pod(kube, NAMES, namespace, members[0]["metadata"]["name"]))
        assert f"scheduling gate {NAMES.gang_gate}" in text and \
            f"holds its PodGroup until room for all {NODES_N} members is free" in text, text
        await kube.delete(PODS, "busy", namespace)
        await kube.request(build_request("delete", JOBS, namespace=namespace, name="small",
                                         body={"propagationPolicy": "Background"}))
        for p in await pods_of(kube, namespace, f"{NAMES.gang}=small"):
            try:
                await kube.delete(PODS, p["metadata"]["name"], namespace)
            except errors.NotFound:
                pass  # the garbage collector was first

        async def large_placed():
            return len(bound(await pods_of(kube, namespace, f"{NAMES.gang}=large"))) == NODES_N
        await wait_for(large_placed, 120, what="the large gang bound whole once the pool is free")
        assert await kube.get_or_none(PODGROUPS, "large", namespace) is not None
        assert not any(gated(p) for p in await pods_of(kube, namespace, f"{NAMES.gang}=large"))
    finally:
        await delete_jobs(kube, namespace)



async def test_a_gang_still_missing_members_keeps_its_turn(kube, namespace, pool_factory, run_capacity):
    """The older gang's size is known but half its members do not exist yet (a large Job's are created over
    seconds): a younger gang that is complete does not take its room meanwhile (gangs.expect_members_seconds);
    once the older gang's last member exists it is placed first, whole, and the younger one after it."""
    pool = await pool_factory(NODES_N)
    c = cfg(pool, namespace).model_dump()
    c["gangs"].update({"hold_until_room_members": 1, "expect_members_seconds": 300})
    _, registry = await run_capacity(CapacityConfig.model_validate(c), namespace)
    spec = pool.pod_spec()
    for i in range(2):
        await kube.create(PODS, gang_member("older", i, NODES_N, spec), namespace)

    async def older_known():
        return await kube.get_or_none(WORKLOADS, "older", namespace)
    await wait_for(older_known, 60, what="the older gang's Workload (its size is known)")
    for i in range(2):
        await kube.create(PODS, gang_member("younger", i, 2, spec), namespace)

    await wait_held(kube, namespace, "younger", 2, "the younger gang held: its room is the older gang's")
    await asyncio.sleep(3.0)  # more passes: a wrong verdict would let the younger gang in now
    assert not bound(await pods_of(kube, namespace, f"{NAMES.gang}=younger")), \
        "the younger gang took the room of the older one while its members were being created"
    assert await kube.get_or_none(PODGROUPS, "younger", namespace) is None
    for i in range(2, NODES_N):
        await kube.create(PODS, gang_member("older", i, NODES_N, spec), namespace)

    await wait_gang_bound(kube, namespace, "older", NODES_N, "the older gang placed whole once its last member exists")
    assert not bound(await pods_of(kube, namespace, f"{NAMES.gang}=younger"))
    for i in range(NODES_N):
        await kube.delete(PODS, f"older-{i}", namespace)

    await wait_gang_bound(kube, namespace, "younger", 2, "the younger gang placed after the older one ended")
