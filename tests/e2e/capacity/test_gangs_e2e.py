"""Two experiments each asking for 100% of the GPU nodes, on the real
scheduler: with gangs one runs whole and the other waits whole (then runs
whole when the first ends); without gangs the same demand is placed partially
and both are stuck."""

from __future__ import annotations

from pathlib import Path

import yaml

from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.explain import explain_pod
from fleetkeeper.core import errors
from fleetkeeper.core.kube import (
    COSCHED_PODGROUPS, CRDS, EVENTS, PODGROUPS, PODS, STATEFULSETS, WORKLOADS, build_request,
)
from fleetkeeper.core.kube import NODES as NODES_RES

from capacity_helpers import NAMES, bound, pods_of, wait_for

NODES = 4
CRD_FILE = Path(__file__).resolve().parents[3] / "deploy" / "capacity" / "coscheduling-podgroup-crd.yaml"


def experiment(name: str, spec: dict, replicas: int) -> dict:
    """A long-running training job: a StatefulSet (Parallel pod management: an
    OrderedReady set would wait for pod 0 to be Ready, which a gang never is
    alone). Only the gang label marks it; fleetkeeper does the rest."""
    labels = {"experiment": name, NAMES.gang: name}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
            "spec": {"replicas": replicas, "podManagementPolicy": "Parallel", "serviceName": name,
                     "selector": {"matchLabels": {"experiment": name}},
                     "template": {"metadata": {"labels": labels}, "spec": spec}}}


def cfg() -> CapacityConfig:
    return CapacityConfig.model_validate({"balloons": {"enabled": False},
                                          "gangs": {"webhook_port": 0, "cleanup_grace_seconds": 0}})


async def test_two_whole_cluster_experiments_with_gangs(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(NODES)
    cap, registry = await run_capacity(cfg(), namespace)
    spec = pool.pod_spec()
    for name in ("exp-a", "exp-b"):
        await kube.create(STATEFULSETS, experiment(name, spec, NODES), namespace)

    async def settled():
        a = await pods_of(kube, namespace, "experiment=exp-a")
        b = await pods_of(kube, namespace, "experiment=exp-b")
        if len(a) == NODES and len(b) == NODES and sorted([len(bound(a)), len(bound(b))]) == [0, NODES]:
            return a, b
        return None
    a, b = await wait_for(settled, 90, what="one experiment placed whole")
    winner, loser = ("exp-a", "exp-b") if len(bound(a)) == NODES else ("exp-b", "exp-a")
    win_pods = bound(a) if winner == "exp-a" else bound(b)
    assert {p["spec"]["nodeName"] for p in win_pods} == set(pool.nodes)
    # every member carries the group reference the webhook set at creation
    for p in a + b:
        assert p["spec"]["schedulingGroup"]["podGroupName"] == p["metadata"]["labels"][NAMES.gang]
    # fleetkeeper created the groups with minCount = replicas, owned by the StatefulSet
    pg = await kube.get(PODGROUPS, winner, namespace)
    assert pg["spec"]["schedulingPolicy"]["gang"]["minCount"] == NODES
    assert pg["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"
    wl = await kube.get(WORKLOADS, loser, namespace)
    assert wl["spec"]["controllerRef"]["name"] == loser

    # the loser waits whole, with the reason visible in explain. Which of two ways depends on whether
    # the balloon pass judged it before or after the winner took the pool (both arrive at once):
    # - held by fleetkeeper (its pool's simulation found no room): no PodGroup, its members gated;
    # - judged while the pool was still free: its PodGroup exists and kube-scheduler reports it waiting.
    async def explained():
        pods = await pods_of(kube, namespace, f"experiment={loser}")
        lines = await explain_pod(kube, NAMES, namespace, pods[0]["metadata"]["name"])
        text = "\n".join(lines)
        if await kube.get_or_none(PODGROUPS, loser, namespace) is None:
            gated = all(any(g.get("name") == NAMES.gang_gate for g in p["spec"].get("schedulingGates") or ())
                        for p in pods)
            return text if gated and f"scheduling gate {NAMES.gang_gate}" in text and \
                f"holds its PodGroup until room for all {NODES} members is free" in text else None
        # the scheduler's own words, quoted: the group's condition and the pod's
        return text if "scheduler on PodGroup: PodGroupScheduled=False Unschedulable" in text and \
            "scheduler on pod: PodScheduled=False" in text and "gang state (fleetkeeper): Waiting" in text and \
            f"minimum members placed together: {NODES}" in text else None
    await wait_for(explained, 30, what="explain shows the loser waiting whole")

    async def counted():
        return registry.get_sample_value("fleetkeeper_gangs", {"state": "Waiting"}) == 1 and \
            registry.get_sample_value("fleetkeeper_gangs", {"state": "Running"}) == 1
    await wait_for(counted, 20, what="gang metrics: one Waiting, one Running")

    # the winner ends: the loser runs whole
    await kube.request(build_request("delete", STATEFULSETS, namespace=namespace, name=winner,
                                     body={"propagationPolicy": "Background"}))

    async def loser_runs():
        pods = await pods_of(kube, namespace, f"experiment={loser}")
        return len(bound(pods)) == NODES and all(p["status"].get("phase") == "Running" for p in pods)
    await wait_for(loser_runs, 90, what=f"{loser} placed whole after {winner} ended")

    # groups of a finished gang are cleaned up once its pods are gone
    async def groups_gone():
        return await kube.get_or_none(PODGROUPS, winner, namespace) is None and \
            await kube.get_or_none(WORKLOADS, winner, namespace) is None
    await wait_for(groups_gone, 60, what=f"{winner}'s Workload and PodGroup removed")


async def test_same_demand_without_gangs_deadlocks(kube, namespace, pool_factory):
    """No fleetkeeper gangs: members of both experiments, arriving interleaved
    as they do from two controllers, each take part of the cluster; neither can
    ever start (the article's deadlock)."""
    pool = await pool_factory(NODES)
    spec = pool.pod_spec()
    for i in range(NODES):
        for exp in ("exp-a", "exp-b"):
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": f"{exp}-{i}", "labels": {"experiment": exp}},
                                     "spec": spec}, namespace)

    async def placed():
        a = await pods_of(kube, namespace, "experiment=exp-a")
        b = await pods_of(kube, namespace, "experiment=exp-b")
        return (a, b) if len(bound(a)) + len(bound(b)) == NODES else None
    a, b = await wait_for(placed, 60, what="the nodes filled")
    assert 0 < len(bound(a)) < NODES and 0 < len(bound(b)) < NODES, \
        f"expected a partial placement of both, got {len(bound(a))} and {len(bound(b))}"
    assert len(a) - len(bound(a)) > 0 and len(b) - len(bound(b)) > 0


async def test_member_node_lost_reports_the_job_broken(kube, namespace, pool_factory, run_capacity):
    """A node under a running gang disappears: fleetkeeper reports the job as
    Broken (it must restart whole from its checkpoint) on the StatefulSet and the
    group objects."""
    pool = await pool_factory(2)
    cap, registry = await run_capacity(cfg(), namespace)
    await kube.create(STATEFULSETS, experiment("exp-c", pool.pod_spec(), 2), namespace)

    async def running():
        pods = await pods_of(kube, namespace, "experiment=exp-c")
        return len(bound(pods)) == 2 and all(p["status"].get("phase") == "Running" for p in pods)
    await wait_for(running, 60, what="the gang running")
    await kube.delete(NODES_RES, pool.nodes[1])

    async def reported():
        items, _ = await kube.list(EVENTS, namespace)
        return [e for e in items if e.get("reason") == "GangBroken"]
    events = await wait_for(reported, 30, what="a GangBroken event")
    assert events[0]["regarding"]["kind"] == "StatefulSet" and "restart whole" in events[0]["note"]
    assert pool.nodes[1] in events[0]["note"]
    assert registry.get_sample_value("fleetkeeper_gang_broken_total") >= 1


async def test_coscheduling_podgroups_created_and_removed(kube, namespace, pool_factory, run_capacity):
    """With the scheduler-plugins CRD installed and backend "both", fleetkeeper
    also creates the Coscheduling PodGroup and labels members for it (the
    scheduler-plugins scheduler itself is not part of the local control plane)."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    created_crd = False
    if await kube.get_or_none(CRDS, crd["metadata"]["name"]) is None:
        await kube.create(CRDS, crd)
        created_crd = True
    try:
        async def served():
            try:
                await kube.list(COSCHED_PODGROUPS, namespace)
                return True
            except errors.NotFound:
                return False
        await wait_for(served, 30, what="the coscheduling PodGroup API served")
        pool = await pool_factory(2)
        both = CapacityConfig.model_validate({"balloons": {"enabled": False},
                                              "gangs": {"webhook_port": 0, "backend": "both",
                                                        "cleanup_grace_seconds": 0}})
        await run_capacity(both, namespace)
        for i in range(2):
            await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": f"cs-{i}", "labels": {NAMES.gang: "cs"},
                                                  "annotations": {NAMES.gang_min: "2"}},
                                     "spec": pool.pod_spec()}, namespace)

        async def group():
            return await kube.get_or_none(COSCHED_PODGROUPS, "cs", namespace)
        pg = await wait_for(group, 30, what="the coscheduling PodGroup")
        assert pg["spec"]["minMember"] == 2 and pg["spec"]["scheduleTimeoutSeconds"] == 600
        pod = await kube.get(PODS, "cs-0", namespace)
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "cs"
        for i in range(2):
            await kube.delete(PODS, f"cs-{i}", namespace, grace_period=0)

        async def gone():
            return await kube.get_or_none(COSCHED_PODGROUPS, "cs", namespace) is None and \
                await kube.get_or_none(PODGROUPS, "cs", namespace) is None
        await wait_for(gone, 60, what="the gang's group objects removed after its pods")
    finally:
        if created_crd:
            await kube.delete(CRDS, crd["metadata"]["name"])
