"""Room released for a gang stays that gang's, on the real control plane (balloons and gangs on).

A pool of 4 nodes full of balloons. An older gang of 4 (``gang-min-members: 4``) whose members are created
over time, as a large Job's are: the first 3 exist, the gang counts whole (``gangs.expect_members_seconds``)
and the balloons are released for it. Before its last member exists, a pod of other work (no gang: nothing
holds it) is bound onto one of the freed nodes, so the gang no longer fits. A younger gang of 2 arrives that
fits the room left; backfill used to hand it that room and the older gang then waited for its reservation
threshold (default 300 s; docs/capacity.md, "the 1,000-pod gang ran last"). Now the older gang's claim keeps
the younger one held; once the last member exists, the 4 nodes are reserved for the older gang at once, long
before its threshold, and the stray pod runs on. When the stray pod ends, the older gang is placed whole, and
the younger one after it.
"""

from __future__ import annotations

import asyncio

from capacity_helpers import (NAMES, balloons_on_every_node, bound, gang_member, pods_of, wait_for, wait_gang_bound,
                              wait_held)
from fleetkeeper.capacity import reserve as rs
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.core.events import flush_all
from fleetkeeper.core.kube import EVENTS, NODES, PODGROUPS, PODS

NODES_N = 4
STRAY = "e2e.fleetkeeper.io/stray"


def cfg(pool, namespace: str) -> CapacityConfig:
    """Default settings but for what a private pool in a shared test cluster needs, and a window for a gang's
    missing members long enough that the test does not race it."""
    return CapacityConfig.model_validate({
        "balloons": {"namespace": namespace, "priority_class": f"fk-balloon-{pool.pool}",
                     "tolerations": [pool.toleration],
                     "pools": [{"name": pool.pool, "resource": "gpu", "max_nodes": NODES_N}]},
        "gangs": {"webhook_port": 0, "expect_members_seconds": 600},
    })



async def test_room_released_for_a_gang_stays_its_own_when_other_work_takes_part_of_it(
        kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(NODES_N)
    c = cfg(pool, namespace)
    assert c.gangs.reserve_after_seconds == 300.0  # the default threshold: the test ends long before it
    await run_capacity(c, namespace)
    spec = pool.pod_spec()
    await balloons_on_every_node(kube, namespace, pool.pool, NODES_N)
    for i in range(NODES_N - 1):
        await kube.create(PODS, gang_member("older", i, NODES_N, spec), namespace)

    async def balloons_gone():
        items = await pods_of(kube, namespace, f"{NAMES.balloon}={pool.pool}")
        return not items
    await wait_for(balloons_gone, 90, what="every balloon released for the older gang (it counts whole)")
    assert not bound(await pods_of(kube, namespace, f"{NAMES.gang}=older")), "3 of 4 members: none is placed"
    await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stray", "labels": {STRAY: "1"}},
                             "spec": spec}, namespace)

    async def stray_bound():
        return bound(await pods_of(kube, namespace, STRAY))
    stray = (await wait_for(stray_bound, 60, what="other work bound onto the freed room"))[0]["spec"]["nodeName"]
    for i in range(2):
        await kube.create(PODS, gang_member("younger", i, 2, spec), namespace)

    await wait_held(kube, namespace, "younger", 2, "the younger gang held: the room left is the older gang's")
    await asyncio.sleep(3.0)  # more passes: a wrong verdict would let the younger gang in now
    assert not bound(await pods_of(kube, namespace, f"{NAMES.gang}=younger")), \
        "the younger gang took the room released for the older one"
    assert await kube.get_or_none(PODGROUPS, "younger", namespace) is None
    # nothing written for the claim while the older gang lacks a member (a member created later would lack
    # the toleration)
    key = rs.reserved_key(NAMES)
    nodes = [await kube.get(NODES, n) for n in pool.nodes]
    assert not any(t.get("key") == key for n in nodes for t in n["spec"].get("taints") or ())

    await kube.create(PODS, gang_member("older", NODES_N - 1, NODES_N, spec), namespace)
    tok = rs.token(f"{namespace}/older")

    async def reserved():
        got = [await kube.get(NODES, n) for n in pool.nodes]
        return all(any(t.get("key") == key and t.get("value") == tok for t in n["spec"].get("taints") or ())
                   for n in got)
    await wait_for(reserved, 60, what="all 4 nodes reserved for the older gang (its claim, not its wait)")
    assert [p["spec"]["nodeName"] for p in bound(await pods_of(kube, namespace, STRAY))] == [stray], \
        "the stray pod runs on (NoSchedule)"
    await flush_all(60)  # Events are written by the recorders' sinks, after the action
    events, _ = await kube.list(EVENTS, namespace)
    notes = [e.get("note", "") for e in events if e.get("reason") == "GangRoomReserved"]
    assert any("other work took part of the room released for it" in n for n in notes), notes
    assert not bound(await pods_of(kube, namespace, f"{NAMES.gang}=younger"))

    await kube.delete(PODS, "stray", namespace)

    await wait_gang_bound(kube, namespace, "older", NODES_N, "the older gang placed whole once the stray pod ended")
    assert not bound(await pods_of(kube, namespace, f"{NAMES.gang}=younger"))
    for i in range(NODES_N):
        await kube.delete(PODS, f"older-{i}", namespace)

    await wait_gang_bound(kube, namespace, "younger", 2, "the younger gang placed after the older one ended")
    for i in range(2):
        await kube.delete(PODS, f"younger-{i}", namespace)
