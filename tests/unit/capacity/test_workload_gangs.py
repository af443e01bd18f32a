"""Gangs declared by the workload: size and members from the workload itself."""

from __future__ import annotations

import pytest

from fleetkeeper.capacity import gangs as gg
from fleetkeeper.capacity.workload_gangs import gang_name, mutate_workload, webhook_rules, workload_gang
from fleetkeeper.core.domain import Names
from fleetkeeper.core.webhook import AdmissionRequest

N = Names()


def t() -> dict:
    return {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}


def jobset(**ann) -> dict:
    return {"metadata": {"name": "train", "annotations": ann}, "spec": {"replicatedJobs": [
        {"name": "workers", "replicas": 3, "template": {"spec": {"parallelism": 4, "completions": 4, "template": t()}}},
        {"name": "driver", "template": {"spec": {"template": {"spec": {}}}}},  # replicas 1 x parallelism 1
        {"name": "capped", "replicas": 2, "template": {"spec": {"parallelism": 8, "completions": 2, "template": t()}}},
    ]}}


def mpijob(policy=None) -> dict:
    spec = {"mpiReplicaSpecs": {"Launcher": {"replicas": 1, "template": t()}, "Worker": {"replicas": 8, "template": t()}}}
    if policy:
        spec["launcherCreationPolicy"] = policy
    return {"metadata": {"name": "mpi"}, "spec": spec}


@pytest.mark.parametrize("group,kind,obj,size", [
    ("jobset.x-k8s.io", "JobSet", jobset(), 3 * 4 + 1 + 2 * 2),
    ("kubeflow.org", "MPIJob", mpijob(), 9),
    ("kubeflow.org", "MPIJob", mpijob("WaitForWorkersReady"), 8),  # launcher waits for ready workers
    ("kubeflow.org", "PyTorchJob", {"metadata": {"name": "pt"}, "spec": {"pytorchReplicaSpecs": {
        "Master": {"replicas": 1, "template": t()}, "Worker": {"replicas": 15, "template": t()}}}}, 16),
    ("leaderworkerset.x-k8s.io", "LeaderWorkerSet", {"metadata": {"name": "l"}, "spec": {
        "leaderWorkerTemplate": {"size": 4, "leaderTemplate": t(), "workerTemplate": t()}}}, 4),
])
def test_size_comes_from_the_workload(group, kind, obj, size):
    g = workload_gang(group, kind, obj)
    assert g is not None and g.size == size, g


def test_not_gang_kinds():
    assert workload_gang("apps", "Deployment", {"spec": {"replicas": 3}}) is None
    assert workload_gang("ray.io", "RayCluster", {"spec": {}}) is None
    assert workload_gang("jobset.x-k8s.io", "JobSet", {"metadata": {"name": "e"}, "spec": {}}) is None


def req(obj, group="jobset.x-k8s.io", kind="JobSet", op="CREATE") -> AdmissionRequest:
    return AdmissionRequest("u", kind, op, "ns", "x", "alice", ("team-a",), obj, None, False, group)


def test_every_member_template_gets_the_gang_label_and_size():
    from fleetkeeper.teams.admission import apply_ops  # noqa: PLC0415 - a test may use both components

    obj = jobset()
    r = mutate_workload(req(obj), N)
    out = apply_ops(obj, r.patch)
    for rj in out["spec"]["replicatedJobs"]:
        meta = rj["template"]["spec"]["template"]["metadata"]
        assert meta["labels"][N.gang] == "jobset-train" and meta["annotations"][N.gang_min] == "17"
    # a pod copied from the template joins the gang with its size from the first member: no settle timer
    pod = gg.GangPod("ns", "p", "u", "jobset-train", "17", "", "Pending", False, 0.0, "Job", "train-workers-0",
                     "j", "batch/v1", "", "", "")
    assert gg.resolve_min([pod], gg.Owner("Job", "train-workers-0", "j", "batch/v1", 4), 0.0, 60.0)[:3] == (
        17, "annotation", None)


def test_opt_out_update_and_author_chosen_gang():
    assert mutate_workload(req(jobset(**{N.gang_opt_out: "false"})), N).patch == []
    assert mutate_workload(req(jobset(), op="UPDATE"), N).patch == []
    obj = mpijob()
    obj["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"][N.gang] = "mine"
    ops = mutate_workload(req(obj, "kubeflow.org", "MPIJob"), N).patch
    assert all("/Worker/" not in op["path"] for op in ops) and any("/Launcher/" in op["path"] for op in ops)


def test_names_and_rules():
    assert gang_name("MPIJob", "Train_1.x") == "mpijob-train-1-x"
    covered = {(g, r) for rule in webhook_rules() for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("jobset.x-k8s.io", "jobsets") in covered and ("kubeflow.org", "mpijobs") in covered
