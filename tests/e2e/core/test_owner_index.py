"""The owner index reads an owner live when its watch has not delivered it yet: a
controller's pod admitted on a loaded API server is judged by its real requester,
never by the controller's own identity."""

from __future__ import annotations

from fleetkeeper.core.attribution import Stamp, resolve
from fleetkeeper.core.domain import Names
from fleetkeeper.core.owners import OwnerIndex
from fleetkeeper.core.resources import Resource

CRONJOBS = Resource("batch", "v1", "cronjobs", "CronJob", True)
JOBS = Resource("batch", "v1", "jobs", "Job", True)

POD_SPEC = {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}


async def test_an_owner_chain_the_cache_has_not_seen_is_read_live(kube, namespace):
    names = Names("fleetkeeper.io")
    cron = await kube.create(CRONJOBS, {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "nightly", "namespace": namespace,
                     "annotations": {names.requester: Stamp("alice", ("team-a",)).encode()}},
        "spec": {"schedule": "0 0 1 1 *", "suspend": True,
                 "jobTemplate": {"spec": {"template": {"spec": POD_SPEC}}}}}, namespace)
    cref = {"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly", "uid": cron["metadata"]["uid"],
            "controller": True}
    job = await kube.create(JOBS, {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "nightly-1", "namespace": namespace, "ownerReferences": [cref]},
        "spec": {"suspend": True, "template": {"spec": POD_SPEC}}}, namespace)
    jref = {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-1", "uid": job["metadata"]["uid"],
            "controller": True}

    index = OwnerIndex(kube, names, [JOBS, CRONJOBS])  # its informers never run: every level is a miss
    assert index.get(jref["uid"]) is None
    entry = await index.ensure(namespace, jref, 0.0)
    assert entry is not None and entry.name == "nightly-1" and entry.stamp is None
    stamp, chain = resolve(jref["uid"], index.get)
    assert stamp == Stamp("alice", ("team-a",))
    assert [e.kind for e in chain] == ["Job", "CronJob"]

    # a reference whose uid is not the object's (deleted and made again under the same name) is not read
    stale = dict(jref, uid="00000000-0000-0000-0000-000000000000")
    assert await OwnerIndex(kube, names, [JOBS, CRONJOBS]).ensure(namespace, stale, 0.0) is None
    # nor a kind the index does not cover
    other = OwnerIndex(kube, names, [CRONJOBS])
    assert await other.ensure(namespace, jref, 0.0) is None and other.get(cref["uid"]) is None
