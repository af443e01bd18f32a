"""The workloads researchers run, with their real controllers: the JobSet
controller and the MPI operator, built from their Go modules, run against the
local control plane as their own service accounts and create pods on KWOK
nodes. CRDs of PyTorchJob, LeaderWorkerSet and RayJob come from their modules
(their controllers are not run here)."""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import CapacityOptions, setup as capacity_setup
from fleetkeeper.core import errors
from fleetkeeper.core.attribution import Stamp
from fleetkeeper.core.kube import JOBS, MUTATING_WEBHOOKS, PODGROUPS, PODS, Resource
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster import operators as ops

from e2e_helpers import until_webhook_answers
from teams_e2e_helpers import NAMES, WEBHOOK_LABEL, until
from test_teams_e2e import config

JOBSETS = Resource("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet", True)
MPIJOBS = Resource("kubeflow.org", "v2beta1", "mpijobs", "MPIJob", True)
PYTORCHJOBS = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", True)
LWS = Resource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", "LeaderWorkerSet", True)
RAYJOBS = Resource("ray.io", "v1", "rayjobs", "RayJob", True)
A_TOL = {"key": NAMES.team, "operator": "Equal", "value": "team-a", "effect": "NoSchedule"}
BLANKET = {"operator": "Exists"}
PREFLIGHT = {"key": NAMES.preflight, "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="session")
def built():
    """Build (or reuse) the controllers and CRDs; a failed build is reported, not hidden.
    ``FLEETKEEPER_E2E_OPERATORS`` (default ``all``) limits which controllers are built."""
    want = os.environ.get("FLEETKEEPER_E2E_OPERATORS", "all")
    try:
        return ops.build(want), ""
    except errors.ClusterError as exc:
        return ops.build("crds"), str(exc)


@pytest.fixture(scope="session")
def operators(cluster, built):
    dirs, build_error = built
    workdir = Path(tempfile.mkdtemp(prefix="fk-operators-"))

    async def up():
        kube = await cluster.connect()
        o = ops.Operators(cluster, kube, workdir, namespace_labels={WEBHOOK_LABEL: "enabled"})
        try:
            await o.install_crds(dirs)
            if "jobset-controller" in dirs:
                await o.start_jobset(dirs["jobset-controller"])
            if "mpi-operator" in dirs:
                await o.start_mpi(dirs["mpi-operator"])
        except BaseException:
            await o.stop()
            raise
        finally:
            await kube.close()  # this event loop ends here; stop() connects again
        return o

    o = asyncio.run(up())
    o.build_error = build_error
    try:
        yield o
    finally:
        async def down():
            o.kube = await cluster.connect()
            await o.stop()
            await o.kube.close()
        asyncio.run(down())
        shutil.rmtree(workdir, ignore_errors=True)


def container(env, gpus: int) -> dict:
    return copy.deepcopy(env.pod("x", gpus=gpus)["spec"]["containers"][0])


def tmpl(env, app: str, gpus: int = 1, tolerations=None) -> dict:
    spec: dict = {"containers": [container(env, gpus)], "nodeSelector": env.selector(),
                  "terminationGracePeriodSeconds": 0, "restartPolicy": "Never"}
    if tolerations is not None:
        spec["tolerations"] = tolerations
    return {"metadata": {"labels": {"app": app}}, "spec": spec}


def jobset(env, name, replicas=2, parallelism=2, **kw) -> dict:
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": name},
            "spec": {"replicatedJobs": [{"name": "workers", "replicas": replicas, "template": {"spec": {
                "parallelism": parallelism, "completions": parallelism, "backoffLimit": 0,
                "template": tmpl(env, name, **kw)}}}]}}


def mpijob(env, name, workers=2, **kw) -> dict:
    launcher = tmpl(env, name, gpus=0, **kw)
    launcher["spec"].pop("restartPolicy")
    worker = tmpl(env, name, **kw)
    worker["spec"].pop("restartPolicy")
    return {"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": {"name": name},
            "spec": {"slotsPerWorker": 1, "runPolicy": {"cleanPodPolicy": "None"},
                     "mpiReplicaSpecs": {"Launcher": {"replicas": 1, "template": launcher},
                                         "Worker": {"replicas": workers, "template": worker}}}}


def pytorchjob(env, name, **kw) -> dict:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": tmpl(env, name, **kw)},
                                             "Worker": {"replicas": 2, "template": tmpl(env, name, **kw)}}}}


def lws(env, name, **kw) -> dict:
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": {"name": name},
            "spec": {"replicas": 1, "leaderWorkerTemplate": {"size": 3, "workerTemplate": tmpl(env, name, **kw)}}}


def rayjob(env, name, **kw) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name},
            "spec": {"entrypoint": "python train.py", "rayClusterSpec": {
                "headGroupSpec": {"rayStartParams": {}, "template": tmpl(env, name, gpus=0)},
                "workerGroupSpecs": [{"groupName": "gpu", "minReplicas": 1, "maxReplicas": 2, "rayStartParams": {},
                                      "template": tmpl(env, name, **kw)}]}}}


KINDS = {"JobSet": (JOBSETS, jobset), "MPIJob": (MPIJOBS, mpijob), "PyTorchJob": (PYTORCHJOBS, pytorchjob),
         "LeaderWorkerSet": (LWS, lws), "RayJob": (RAYJOBS, rayjob)}


async def start_capacity(env, tmp: Path):
    """capacity's gangs (webhooks + controller) for the test namespace."""
    settings = RuntimeSettings(namespace=env.namespace, server={"port": 0}, leader_election={"enabled": False})
    mgr = Manager(env.kube, settings, registry=CollectorRegistry())
    name = f"fk-capacity-{secrets.token_hex(3)}"
    cfg = CapacityConfig.model_validate({"balloons": {"enabled": False}, "gangs": {"webhook_port": 0}})
    cap = await capacity_setup(mgr, CapacityOptions(
        config=cfg, webhook_cert_dir=tmp / "wh", webhook_config_name=name, unregister_on_exit=True,
        namespace_selector={"matchLabels": {"kubernetes.io/metadata.name": env.namespace}}))
    task = asyncio.create_task(mgr.run())
    waiter = asyncio.create_task(cap.webhook.ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert waiter in done, "gang webhook did not become ready"
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "webhook-probe", "labels": {NAMES.gang: "probe"}},
             "spec": {"containers": [{"name": "probe", "image": "probe"}]}}
    await until_webhook_answers(env.kube, PODS, probe, env.namespace,
                                lambda o: (o["spec"].get("schedulingGroup") or {}).get("podGroupName") == "probe",
                                "the gang webhook")
    return task, name


async def stop_capacity(env, task, name):
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    try:
        await env.kube.delete(MUTATING_WEBHOOKS, name)
    except errors.NotFound:
        pass


ALICE = {"JobSet": ("jobset-controller", JOBSETS, lambda env: jobset(env, "js", replicas=2, parallelism=2), "js", 4),
         "MPIJob": ("mpi-operator", MPIJOBS, lambda env: mpijob(env, "mpi", workers=2), "mpi", 3)}


@pytest.mark.parametrize("kind", list(ALICE))
async def test_alice_jobset_and_mpijob_pods_carry_only_team_a(env, operators, tmp_path, kind):
    controller, res, make, app, size = ALICE[kind]
    if controller not in operators.procs:
        pytest.fail(f"{controller} did not build or start: {operators.build_error}")
    await env.create_nodes(6)
    await env.write_config(config(env, [("team-a", 2), ("team-b", 2)]))
    await env.start()
    cap_task, cap_name = await start_capacity(env, tmp_path)
    try:
        async def teams_set():
            c = await env.counts()
            return c if c == {"team-a": 2, "team-b": 2} else None
        await until(teams_set, 60, "team nodes assigned")
        node_team = {n: label for n, (label, _) in (await env.node_teams()).items()}
        alice = await env.user("alice")
        await alice.create(res, make(env), env.namespace)
        stamp = (await env.kube.get(res, app, env.namespace))["metadata"]["annotations"][NAMES.requester]
        assert Stamp.decode(stamp) == Stamp("alice", ("team-a",))

        async def running():
            items, _ = await env.kube.list(PODS, env.namespace, label_selector=f"app={app}")
            bound = [p for p in items if p["spec"].get("nodeName")]
            return items if len(items) == size and len(bound) == size else None
        try:
            pods = await until(running, 180, f"{size} pods of the {kind} bound")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{controller} log:\n{operators.log_tail(controller)}") from None
        gangs = {p["metadata"]["labels"].get(NAMES.gang) for p in pods}
        sizes = {p["metadata"].get("annotations", {}).get(NAMES.gang_min) for p in pods}
        assert len(gangs) == 1 and None not in gangs, gangs
        assert sizes == {str(size)}, sizes
        pg = await env.kube.get_or_none(PODGROUPS, gangs.pop(), env.namespace)
        assert pg is not None and pg["spec"]["schedulingPolicy"]["gang"]["minCount"] == size
        for p in pods:
            team_tols = [t for t in p["spec"].get("tolerations") or () if t.get("key") in (NAMES.team, "", None)]
            assert team_tols == [A_TOL], (p["metadata"]["name"], team_tols)
            assert node_team[p["spec"]["nodeName"]] in ("team-a", ""), (p["metadata"]["name"], p["spec"]["nodeName"])
            assert Stamp.decode((p["metadata"].get("annotations") or {}).get(NAMES.requester)) in (
                None, Stamp("alice", ("team-a",)))  # pods of the Job controller skip the webhook: no stamp
        if kind == "MPIJob":  # the operator's own pods (the workers) were attributed to alice, not the operator
            by_operator = [p for p in pods if any(r.get("kind") == "MPIJob" for r in p["metadata"].get("ownerReferences") or ())]
            assert len(by_operator) == 2
            for p in by_operator:
                assert Stamp.decode(p["metadata"]["annotations"][NAMES.requester]) == Stamp("alice", ("team-a",))
        else:  # the JobSet controller's Jobs were attributed to alice
            jobs, _ = await env.kube.list(JOBS, env.namespace)
            assert len(jobs) == 2
            for j in jobs:
                assert Stamp.decode(j["metadata"]["annotations"][NAMES.requester]) == Stamp("alice", ("team-a",))
    finally:
        await stop_capacity(env, cap_task, cap_name)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_every_kind_refuses_foreign_blanket_and_lifecycle_tolerations(env, operators, kind):
    await env.write_config(config(env, [("team-a", 0), ("team-b", 0)]))
    await env.start()
    res, make = KINDS[kind]
    bob, mallory = await env.user("bob"), await env.user("mallory")
    for client, tols, words in ((bob, [A_TOL], ("team 'team-a'", "teams: team-b")),
                                (mallory, [A_TOL], ("team 'team-a'", "member of no team")),
                                (mallory, [BLANKET], ("every team", "member of no team")),
                                (bob, [PREFLIGHT], ("lifecycle", NAMES.preflight, "teams: team-b"))):
        with pytest.raises(errors.Forbidden) as ei:
            await client.create(res, make(env, "sneaky", tolerations=tols), env.namespace)
        assert "fleetkeeper teams" in ei.value.message and "template spec." in ei.value.message
        for w in words:
            assert w in ei.value.message, (w, ei.value.message)
        assert await env.kube.get_or_none(res, "sneaky", env.namespace) is None
    # an honest one is admitted, stamped, and its templates carry bob's team
    await bob.create(res, make(env, "honest"), env.namespace)
    got = await env.kube.get(res, "honest", env.namespace)
    assert Stamp.decode(got["metadata"]["annotations"][NAMES.requester]) == Stamp("bob", ("team-b",))
    if kind == "MPIJob":  # the UPDATE path (JobSet's replicatedJobs are immutable)
        with pytest.raises(errors.Forbidden) as ei:
            await bob.patch(res, "honest", [{"op": "add", "path": "/spec/mpiReplicaSpecs/Worker/template/spec/tolerations/-",
                                             "value": A_TOL}], env.namespace, patch_type="json")
        assert "team 'team-a'" in ei.value.message and "teams: team-b" in ei.value.message


async def test_a_workload_whose_controller_is_exempt_is_still_judged(env, operators):
    sa = "system:serviceaccount:" + ":".join(ops.JOBSET)
    await env.write_config(config(env, [("team-a", 0), ("team-b", 0)], f"exempt: {{users: ['{sa}'], groups: [system:masters]}}\n"))
    await env.start()
    bob = await env.user("bob")
    with pytest.raises(errors.Forbidden) as ei:
        await bob.create(JOBSETS, jobset(env, "js", tolerations=[A_TOL]), env.namespace)
    assert "team 'team-a'" in ei.value.message and "teams: team-b" in ei.value.message
