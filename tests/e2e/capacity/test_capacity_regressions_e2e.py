"""Regressions, default configuration (balloons and gangs on), real scheduler:

* a gang stays Running until every member finished (succeeded members count);
* deleting a finished gang's Job never re-creates its group objects;
* turning balloons off (and restarting) removes the balloon Deployments;
* turning gangs off (and restarting) leaves no gang held for good: one admitted as a gang is finished as one;
* the priority ladder: a borrower (priority -100) and a periodic re-test
  (priority -100, preemptionPolicy Never, pinned to a node) both get nodes
  that balloons hold.
"""

from __future__ import annotations

import asyncio

import pytest
from capacity_helpers import (NAMES, balloons_on_every_node, bound, gang_member, pods_of, wait_for, wait_gang_bound,
                              wait_held)
from fleetkeeper.capacity import controller as capacity_controller
from fleetkeeper.capacity import gangs as gg
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.core import errors
from fleetkeeper.core.events import flush_all
from fleetkeeper.core.kube import DEPLOYMENTS, EVENTS, JOBS, PODGROUPS, PODS, PRIORITYCLASSES, WORKLOADS, build_request
from fleetkeeper.core.resources import Resource

SIM_RESULT, SIM_DELAY = "fleetkeeper.io/sim-result", "fleetkeeper.io/sim-delay"


def cfg(pool, namespace: str, nodes: int, gangs: dict | None = None, **balloons) -> CapacityConfig:
    return CapacityConfig.model_validate({
        "balloons": {"namespace": namespace, "priority_class": f"fk-balloon-{pool.pool}",
                     "tolerations": [pool.toleration],
                     "pools": [{"name": pool.pool, "resource": "gpu", "max_nodes": nodes}], **balloons},
        "gangs": {"webhook_port": 0, "cleanup_grace_seconds": 0, **(gangs or {})},
    })


async def drop_priority_class(kube, name: str) -> None:
    try:
        await kube.delete(PRIORITYCLASSES, name)
    except errors.NotFound:
        pass


def bare(name: str, gang: str, spec: dict, seconds: int, min_: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {NAMES.gang: gang, "exp": gang},
                         "annotations": {NAMES.gang_min: str(min_), SIM_RESULT: "succeed", SIM_DELAY: f"{seconds}s"}},
            "spec": {**spec, "restartPolicy": "Never"}}


async def test_gang_stays_running_until_every_member_finished(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(2)
    await run_capacity(cfg(pool, namespace, 2), namespace)
    try:
        spec = pool.pod_spec()
        await kube.create(PODS, bare("short", "pair", spec, 3, 2), namespace)
        await kube.create(PODS, bare("long", "pair", spec, 25, 2), namespace)
        state_key = gg.state_annotation(NAMES)

        async def state():
            pg = await kube.get_or_none(PODGROUPS, "pair", namespace)
            return ((pg or {}).get("metadata", {}).get("annotations") or {}).get(state_key)

        async def running():
            return await state() == "Running"
        await wait_for(running, 90, what="the gang Running")
        seen = []
        while True:  # every state the gang reads until the long member has finished
            seen.append(await state())
            pod = await kube.get(PODS, "long", namespace)
            if pod["status"].get("phase") == "Succeeded":
                break
            await asyncio.sleep(0.5)
        short = await kube.get(PODS, "short", namespace)
        assert short["status"]["phase"] == "Succeeded"
        assert "Waiting" not in seen, f"the gang fell back to Waiting while a member still ran: {seen}"

        async def completed():
            return await state() == "Completed"
        await wait_for(completed, 30, what="the gang Completed")
    finally:
        await drop_priority_class(kube, f"fk-balloon-{pool.pool}")


@pytest.mark.parametrize("owner_read_seconds", [None, 1e9], ids=["default", "owner-read-once"])
async def test_deleting_a_gang_job_never_recreates_its_groups(kube, namespace, pool_factory, run_capacity,
                                                             monkeypatch, owner_read_seconds):
    """With ``owner-read-once`` the controller keeps its first read of the Job for good on passes that write
    nothing: a pass that would create a group object must read the Job again, or it re-creates the groups of
    the deleted Job from the pods that are left."""
    if owner_read_seconds is not None:
        monkeypatch.setattr(capacity_controller, "OWNER_READ_SECONDS", owner_read_seconds)
    pool = await pool_factory(3)
    _, registry = await run_capacity(cfg(pool, namespace, 3), namespace)
    try:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
               "spec": {"parallelism": 3, "completions": 3, "backoffLimit": 0,
                        "template": {"metadata": {"labels": {NAMES.gang: "train", "exp": "train"},
                                                  "annotations": {SIM_RESULT: "succeed", SIM_DELAY: "2s"}},
                                     "spec": {**pool.pod_spec(), "restartPolicy": "Never"}}}}
        await kube.create(JOBS, job, namespace)

        async def done():
            j = await kube.get(JOBS, "train", namespace)
            return (j.get("status") or {}).get("succeeded") == 3
        await wait_for(done, 120, what="the gang's Job complete")
        pg = await kube.get(PODGROUPS, "train", namespace)
        assert pg["spec"]["schedulingPolicy"]["gang"]["minCount"] == 3

        def creates() -> float:
            return sum(registry.get_sample_value("fleetkeeper_gang_group_operations_total",
                                                 {"kind": k, "op": "create", "result": "ok"}) or 0
                       for k in ("Workload", "PodGroup"))
        assert creates() == 2

        async def created_events():  # Events are written by the recorder's sink, after the writes
            await flush_all(60)
            events, _ = await kube.list(EVENTS, namespace)
            return [e.get("note") for e in events if e.get("reason") == "GangGroupCreated"]
        # one Event for both objects, or one each when the PodGroup waited for room (hold_until_room_members)
        before = await created_events()
        assert 1 <= len(before) <= 2, before

        def counter(name: str, labels: dict | None = None) -> float:
            return registry.get_sample_value(name, labels or {}) or 0
        reads = counter("fleetkeeper_gang_owner_reads_total")
        passes = sum(counter("fleetkeeper_reconcile_total", {"controller": "capacity-gangs", "result": r})
                     for r in ("success", "requeue", "error"))
        if owner_read_seconds is not None:  # one read, plus one before each pass that created a group object
            assert 1 <= reads <= 3 < passes, f"{reads} owner reads in {passes} passes of the gang controller"
        # the default (background) deletion: the Job goes first, its pods a moment later
        await kube.request(build_request("delete", JOBS, namespace=namespace, name="train",
                                         body={"propagationPolicy": "Background"}))

        async def all_gone():
            pods = await pods_of(kube, namespace, "exp=train")
            pg = await kube.get_or_none(PODGROUPS, "train", namespace)
            wl = await kube.get_or_none(WORKLOADS, "train", namespace)
            return not pods and pg is None and wl is None
        await wait_for(all_gone, 120, what="pods and group objects gone")

        after = await created_events()
        assert creates() == 2 and sorted(after) == sorted(before), \
            f"group objects re-created after the Job was deleted: {creates()} creates, {after}"
    finally:
        await drop_priority_class(kube, f"fk-balloon-{pool.pool}")


async def test_turning_balloons_off_removes_their_deployments(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(2)
    name = f"balloon-{pool.pool}"
    await run_capacity(cfg(pool, namespace, 2), namespace)
    try:
        async def deployed():
            return await kube.get_or_none(DEPLOYMENTS, name, namespace) is not None
        await wait_for(deployed, 60, what="the balloon Deployment")
        await run_capacity.stop_last()
        await run_capacity(cfg(pool, namespace, 2, enabled=False), namespace)

        async def removed():
            return await kube.get_or_none(DEPLOYMENTS, name, namespace) is None
        await wait_for(removed, 60, what="the balloon Deployment removed once balloons are off")
        await flush_all(60)  # Events are written by the recorders' sinks, after the action
        events, _ = await kube.list(EVENTS, namespace)
        assert any(e.get("reason") == "BalloonPoolRemoved" and "disabled" in e.get("note", "") for e in events)
    finally:
        await drop_priority_class(kube, f"fk-balloon-{pool.pool}")


async def test_turning_gangs_off_finishes_the_gangs_already_admitted(kube, namespace, pool_factory, run_capacity):
    """A gang held behind fleetkeeper's gate (its room not free) when gangs are turned off: its members name
    their PodGroup (immutable) and carry the gate, so without fleetkeeper they would pend for good. The next
    process, gangs off, hands it to kube-scheduler at once (PodGroup created, gates lifted) and it is placed
    whole once room frees; it makes no gang of anything else."""
    pool = await pool_factory(3)
    await run_capacity(cfg(pool, namespace, 3), namespace)
    try:
        spec = pool.pod_spec()
        await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stray", "labels": {"exp": "stray"}},
                                 "spec": spec}, namespace)

        async def stray_bound():
            return bound(await pods_of(kube, namespace, "exp=stray"))
        await wait_for(stray_bound, 90, what="other work on one of the pool's 3 nodes")
        for i in range(3):
            await kube.create(PODS, gang_member("train", i, 3, spec), namespace)
        await wait_held(kube, namespace, "train", 3, "the gang held: its room is not free")
        assert await kube.get_or_none(PODGROUPS, "train", namespace) is None
        await run_capacity.stop_last()
        cap, _ = await run_capacity(cfg(pool, namespace, 3, gangs={"enabled": False}, enabled=False), namespace)
        assert cap.gangs is not None and cap.gangs.admitted_only  # started to finish the gangs in flight

        async def handed_over():
            pods = await pods_of(kube, namespace, f"{NAMES.gang}=train")
            gated = [p["metadata"]["name"] for p in pods
                     if any(g["name"] == NAMES.gang_gate for g in p["spec"].get("schedulingGates") or ())]
            pg = await kube.get_or_none(PODGROUPS, "train", namespace)
            return pg if pg is not None and len(pods) == 3 and not gated else None
        await wait_for(handed_over, 60, what="the held gang handed to kube-scheduler (PodGroup, gates lifted)")
        await kube.delete(PODS, "stray", namespace)
        await wait_gang_bound(kube, namespace, "train", 3, "the gang placed whole once room frees")
        # a gang-labelled pod admitted with gangs off is no gang member: no group object is made for it
        await kube.create(PODS, gang_member("late", 0, 2, spec), namespace)

        async def seen():
            return cap.gangs.pods.get(f"{namespace}/late-0") is not None
        await wait_for(seen, 60, what="the late pod in the gang controller's cache")
        assert f"{namespace}/late" not in cap.gangs.members
        assert await kube.get_or_none(WORKLOADS, "late", namespace) is None
    finally:
        await drop_priority_class(kube, f"fk-balloon-{pool.pool}")


async def test_priority_ladder_borrowers_and_retests_get_nodes_balloons_hold(kube, namespace, pool_factory,
                                                                           run_capacity):
    pool = await pool_factory(3)
    low = f"fk-e2e-borrower-{pool.pool}"
    retest = f"fk-e2e-retest-{pool.pool}"
    await kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                        "metadata": {"name": low}, "value": -100})
    await kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                        "metadata": {"name": retest}, "value": -100, "preemptionPolicy": "Never"})
    _, registry = await run_capacity(cfg(pool, namespace, 3), namespace)
    sel = f"{NAMES.balloon}={pool.pool}"
    try:
        await balloons_on_every_node(kube, namespace, pool.pool, 3)
        balloon = (await pods_of(kube, namespace, sel))[0]
        assert balloon["spec"]["priority"] < -100  # the lowest rung
        spec = pool.pod_spec()
        # a periodic re-test: pinned to one node, never preempts
        target = pool.nodes[-1]
        pinned = {**spec, "priorityClassName": retest, "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [target]}]}]}}}}
        await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pf-periodic"},
                                 "spec": pinned}, namespace)
        # a borrower (the teams 'any' toleration pods are low priority like this one), kept off the re-test's
        # node (at equal priority neither would give way to the other there)
        elsewhere = {**spec, "priorityClassName": low, "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": [target]}]}]}}}}
        await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sweep"},
                                 "spec": elsewhere}, namespace)

        async def both_placed():
            a = await kube.get(PODS, "sweep", namespace)
            b = await kube.get(PODS, "pf-periodic", namespace)
            return (a, b) if a["spec"].get("nodeName") and b["spec"].get("nodeName") else None
        try:
            a, b = await wait_for(both_placed, 90, what="the borrower and the pinned re-test placed")
        except AssertionError as exc:
            pods, _ = await kube.list(PODS, namespace)
            raise AssertionError(f"{exc}: {[(p['metadata']['name'], p['spec'].get('nodeName'), p['spec'].get('priority'), [(c['type'], c['status'], c.get('reason'), c.get('message')) for c in p['status'].get('conditions') or ()]) for p in pods]}") from None
        assert b["spec"]["nodeName"] == target
        assert a["spec"]["nodeName"] != target
        # and no balloon sits on their nodes
        pods = await pods_of(kube, namespace, sel)
        assert not {p["spec"].get("nodeName") for p in bound(pods)} & {a["spec"]["nodeName"], target}
        # the re-test never preempts: fleetkeeper released the balloon on its node, and said so
        assert registry.get_sample_value("fleetkeeper_balloon_releases_total",
                                         {"pool": pool.pool, "result": "ok"}) >= 1
        await flush_all(60)  # Events are written by the recorders' sinks, after the action
        events, _ = await kube.list(EVENTS, namespace)
        assert any(e.get("reason") == "BalloonsReleased" and "pf-periodic" in e.get("note", "") for e in events)
    finally:
        for pc in (low, retest, f"fk-balloon-{pool.pool}"):
            await drop_priority_class(kube, pc)


async def test_a_gang_larger_than_the_release_burst_gets_its_balloons_in_one_step(kube, namespace, pool_factory,
                                                                                 run_capacity):
    """release_burst 2, a gang of 3 that cannot preempt (preemptionPolicy Never): only fleetkeeper's release
    can give it room, and a unit larger than the burst is released once the budget is full."""
    pool = await pool_factory(3)
    never = f"fk-e2e-nopreempt-{pool.pool}"
    await kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                        "metadata": {"name": never}, "value": 0, "preemptionPolicy": "Never"})
    _, registry = await run_capacity(cfg(pool, namespace, 3, release_burst=2), namespace)
    try:
        await balloons_on_every_node(kube, namespace, pool.pool, 3)
        spec = {**pool.pod_spec(), "priorityClassName": never}
        for i in range(3):
            await kube.create(PODS, bare(f"w-{i}", "wide", spec, 60, 3), namespace)

        async def placed():
            return len(bound(await pods_of(kube, namespace, "exp=wide"))) == 3
        await wait_for(placed, 120, what="the 3-pod gang placed on the nodes its balloons held")
        assert registry.get_sample_value("fleetkeeper_balloon_releases_total",
                                         {"pool": pool.pool, "result": "ok"}) == 3
        await flush_all(60)  # Events are written by the recorders' sinks, after the action
        events, _ = await kube.list(EVENTS, namespace)
        assert any(e.get("reason") == "BalloonsReleased" and "3 balloon(s)" in e.get("note", "")
                   and "gang" in e.get("note", "") for e in events)
    finally:
        for pc in (never, f"fk-balloon-{pool.pool}"):
            await drop_priority_class(kube, pc)


VAPS = Resource("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies", "ValidatingAdmissionPolicy", False)
VAP_BINDINGS = Resource("admissionregistration.k8s.io", "v1", "validatingadmissionpolicybindings",
                        "ValidatingAdmissionPolicyBinding", False)


async def test_a_gang_whose_owner_is_gone_gets_no_new_groups_even_with_its_owner_read_cached(
        kube, namespace, pool_factory, run_capacity, monkeypatch):
    """The window of a background deletion held open: the Job is gone, the garbage collector has removed the
    gang's group objects but not yet its pods. The controller's last read of the Job (kept for good here) says
    it exists; the pass that finds the group objects missing must read the Job again and create nothing."""
    monkeypatch.setattr(capacity_controller, "OWNER_READ_SECONDS", 1e9)
    pool = await pool_factory(2)
    cap, registry = await run_capacity(cfg(pool, namespace, 2), namespace)
    hold = f"fk-test-hold-pods-{namespace}"
    try:
        # a suspended Job starts no pods of its own; the gang's two members name it as their owner
        job = await kube.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
                                       "spec": {"parallelism": 2, "completions": 2, "suspend": True,
                                                "template": {"spec": {"restartPolicy": "Never", "containers": [
                                                    {"name": "c", "image": "x"}]}}}}, namespace)
        ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "train", "uid": job["metadata"]["uid"]}
        spec = {**pool.pod_spec(), "restartPolicy": "Never", "nodeSelector": {"fleetkeeper-test/none": "x"}}
        for i in range(2):  # never placed (no node matches): members that stay, waiting
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": f"train-{i}", "labels": {NAMES.gang: "train"},
                                                  "ownerReferences": [ref]},
                                     "spec": spec}, namespace)

        async def groups():
            return (await kube.get_or_none(PODGROUPS, "train", namespace) is not None
                    and await kube.get_or_none(WORKLOADS, "train", namespace) is not None)
        await wait_for(groups, 60, what="the gang's PodGroup and Workload")

        def creates() -> float:
            return sum(registry.get_sample_value("fleetkeeper_gang_group_operations_total",
                                                 {"kind": k, "op": "create", "result": "ok"}) or 0
                       for k in ("Workload", "PodGroup"))
        assert creates() == 2
        # the garbage collector may not delete this namespace's pods: they outlive their Job, as they do for a
        # moment in a real background deletion
        await kube.create(VAPS, {"apiVersion": "admissionregistration.k8s.io/v1",
                                 "kind": "ValidatingAdmissionPolicy", "metadata": {"name": hold},
                                 "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": [
                                     {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["DELETE"],
                                      "resources": ["pods"]}]},
                                     "validations": [{"expression": "false", "message": "held by the test"}]}})
        await kube.create(VAP_BINDINGS, {"apiVersion": "admissionregistration.k8s.io/v1",
                                         "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": hold},
                                         "spec": {"policyName": hold, "validationActions": ["Deny"],
                                                  "matchResources": {"namespaceSelector": {"matchLabels": {
                                                      "kubernetes.io/metadata.name": namespace}}}}})
        probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
                 "spec": {"containers": [{"name": "c", "image": "x"}], "nodeSelector": {"fleetkeeper-test/none": "x"}}}

        async def held():  # the API server enforces a new policy once its informer has it
            try:
                await kube.create(PODS, probe, namespace)
            except errors.Conflict:
                pass
            try:
                await kube.delete(PODS, "probe", namespace)
            except errors.ApiError as exc:
                return "held by the test" in str(exc)
            return False
        await wait_for(held, 60, what="pod deletions refused in the test namespace")
        await kube.request(build_request("delete", JOBS, namespace=namespace, name="train",
                                         body={"propagationPolicy": "Background"}))

        async def gone_and_seen():
            # the PodGroup stays (being deleted) while pods name it: kube-scheduler's protection finalizer
            plan = cap.gangs.plans.get(f"{namespace}/train")
            return (await kube.get_or_none(WORKLOADS, "train", namespace) is None
                    and plan is not None and plan.message == "owner Job train is gone")
        await wait_for(gone_and_seen, 90, what="the Workload collected and the gang's owner seen gone")
        pods = await pods_of(kube, namespace, f"{NAMES.gang}=train")
        assert len(pods) == 2 and not any(p["metadata"].get("deletionTimestamp") for p in pods)
        assert creates() == 2, f"{creates()} group objects created: re-created for a Job that is gone"
        assert await kube.get_or_none(WORKLOADS, "train", namespace) is None
        pg = await kube.get_or_none(PODGROUPS, "train", namespace)
        assert pg is None or pg["metadata"].get("deletionTimestamp")
    finally:
        for res in (VAP_BINDINGS, VAPS):
            try:
                await kube.delete(res, hold)
            except errors.NotFound:
                pass
        await drop_priority_class(kube, f"fk-balloon-{pool.pool}")
