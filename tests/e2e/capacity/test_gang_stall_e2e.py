"""The kube-scheduler v1.36 gang stall, made deterministic, and fleetkeeper's repair.

A gang of 3 arrives on a pool of 2 nodes held by placeholders (priority
-1000, the balloons' rung). Two members find a victim and the scheduler starts
their preemption; the third does not fit, so the group fails. The victims'
deletion is held for a few seconds (an admission webhook: a slow API server),
so the members come back to the scheduler's queue while their preemption is
still running and DefaultPreemption's PreEnqueue holds them, for good
(docs/capacity.md). A third node then joins: the gang fits, and the scheduler
never tries it again on its own. fleetkeeper sees a gang that fits and stays
unplaced, creates one requeue pod of the group, and the gang is placed; the
requeue pod is gone afterwards.

Without the repair (``requeue_stuck_after_seconds: None``) the gang stays
Pending on the 3 nodes (seen by hand; not asserted, as that would be a verdict
about time).
"""

from __future__ import annotations

import pytest

from capacity_helpers import NAMES, bound, pods_of, wait_for
from fleetkeeper.capacity import yielding as yd
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.core import errors
from fleetkeeper.core.kube import EVENTS, JOBS, NODES, PODS, PRIORITYCLASSES
from fleetkeeper.localcluster.slowdelete import SlowDeletes

PLACEHOLDER = "e2e.fleetkeeper.io/placeholder"


def cfg(pool, namespace: str, prompt: bool) -> CapacityConfig:
    return CapacityConfig.model_validate({
        "balloons": {"enabled": False, "namespace": namespace,
                     "pools": [{"name": pool.pool, "resource": "gpu", "max_nodes": 3}]},
        "gangs": {"webhook_port": 0, "requeue_stuck_after_seconds": 5,
                  "retry_when_room_frees_after_seconds": 2 if prompt else None},
    })


@pytest.mark.parametrize("prompt", [True, False], ids=["retry-when-room-frees", "stuck-repair-only"])
async def test_a_gang_the_scheduler_stopped_trying_is_requeued_and_placed(kube, namespace, pool_factory,
                                                                           run_capacity, prompt):
    """With the prompt retry (default) the gang is retried as soon as the third node's room is there; with
    only the stuck repair, once it has shown no progress for the threshold. Either way one requeue pod."""
    pool = await pool_factory(3)
    third = pool.nodes[2]
    await kube.patch(NODES, third, {"spec": {"unschedulable": True}})
    pc = f"fk-placeholder-{pool.pool}"
    await kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                        "metadata": {"name": pc}, "value": -1000, "preemptionPolicy": "Never"})
    cap, registry = await run_capacity(cfg(pool, namespace, prompt), namespace)
    spec = pool.pod_spec()
    try:
        for i in range(2):
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": f"placeholder-{i}", "labels": {PLACEHOLDER: "1"}},
                                     "spec": {**spec, "priorityClassName": pc}}, namespace)

        async def placeholders_bound():
            return len(bound(await pods_of(kube, namespace, PLACEHOLDER))) == 2
        await wait_for(placeholders_bound, 60, what="a placeholder on each of the 2 schedulable nodes")
        async with SlowDeletes(kube, PLACEHOLDER, 3.0,
                               namespace_selector={"matchLabels": {"kubernetes.io/metadata.name": namespace}}) as slow:
            await kube.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
                                     "spec": {"parallelism": 3, "completions": 3, "backoffLimit": 0,
                                              "template": {"metadata": {"labels": {NAMES.gang: "train"}},
                                                           "spec": {**spec, "restartPolicy": "Never"}}}},
                              namespace)

            async def placeholders_preempted():
                items, _ = await kube.list(PODS, namespace, label_selector=PLACEHOLDER)
                return slow.held >= 2 and not items
            await wait_for(placeholders_preempted, 90, what="both placeholders preempted by the gang's members")
            await kube.patch(NODES, third, {"spec": {"unschedulable": False}})

            async def placed():
                return len(bound(await pods_of(kube, namespace, f"{NAMES.gang}=train"))) == 3
            await wait_for(placed, 120, what="the gang placed on the 3 nodes")
        reason = "GangRetried" if prompt else "GangRequeued"

        async def written():  # Events are written by the recorder's sink, after the action
            events, _ = await kube.list(EVENTS, namespace)
            return [e.get("note", "") for e in events if e.get("reason") == reason] or None
        notes = await wait_for(written, 60, what=f"the {reason} Event written")
        if prompt:
            assert "room for gang train freed" in notes[0], notes
            op = "kick"
        else:
            assert "gang train has fitted its pool" in notes[0], notes
            op = "create"
        assert registry.get_sample_value("fleetkeeper_gang_requeue_pods_total", {"op": op, "result": "ok"}) >= 1

        async def requeue_pods_gone():
            return not await pods_of(kube, namespace, yd.requeue_label(NAMES))
        await wait_for(requeue_pods_gone, 60, what="the requeue pod removed")
    finally:
        try:
            await kube.delete(PRIORITYCLASSES, pc)
        except errors.NotFound:
            pass
