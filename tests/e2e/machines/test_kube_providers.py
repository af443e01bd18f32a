"""The cluster-api and karpenter providers against the real CRDs of Cluster API and Karpenter
(fetched from their Go modules, hack/fetch-machine-crds.sh) in the real local control plane:
what fleetkeeper writes is accepted by their schemas, selects the right object, and is done
once across a controller restart (the ledger)."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.events import EventRecorder
from fleetkeeper.core.kube import CONFIGMAPS, CRDS, EVENTS, NODES, Kube
from fleetkeeper.machines.actuator import MachineActuator
from fleetkeeper.machines.base import Machine
from fleetkeeper.machines.config import load_config
from fleetkeeper.machines.kube import (CAPI_MACHINE_ANNOTATION, CAPI_NAMESPACE_ANNOTATION, CAPI_REMEDIATE_ANNOTATION,
                                       MACHINES, MACHINESETS, NODECLAIMS, ClusterApiProvider, KarpenterProvider)
from fleetkeeper.machines.ledger import KEY, LEDGER_CONFIGMAP
from e2e_helpers import wait_for

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    out = subprocess.run(["bash", str(ROOT / "hack/fetch-machine-crds.sh")], check=True, capture_output=True,
                         text=True, timeout=600)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture
async def crds(kube, crd_dir):
    names = []
    for f in sorted(crd_dir.glob("*.yaml")):
        body = yaml.safe_load(f.read_text())
        names.append(body["metadata"]["name"])
        await kube.apply(CRDS, body)

    async def established():
        for n in names:
            c = await kube.get(CRDS, n)
            if not any(x["type"] == "Established" and x["status"] == "True"
                       for x in (c.get("status") or {}).get("conditions") or []):
                return False
        return True
    await wait_for(established, 60, "CRDs established")
    # the API server's discovery can lag a moment behind Established
    async def served():
        try:
            await kube.list(MACHINES, "default")
            await kube.list(NODECLAIMS)
            return True
        except errors.NotFound:
            return False
    await wait_for(served, 30, "CRDs served")
    return names


def capi_machine(name: str, ns: str, pid: str) -> dict:
    return {"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
            "metadata": {"name": name, "namespace": ns, "labels": {"cluster.x-k8s.io/cluster-name": "gpu"}},
            "spec": {"clusterName": "gpu", "providerID": pid,
                     "bootstrap": {"dataSecretName": f"{name}-bootstrap"},
                     "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "DockerMachine",
                                           "name": name}}}


def nodeclaim(name: str) -> dict:
    return {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
            "metadata": {"name": name, "labels": {"karpenter.sh/nodepool": "gpu"}},
            "spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "gpu"},
                     "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In",
                                       "values": ["p5.48xlarge"]}]}}


async def make_node(kube, name: str, pid: str, annotations: dict | None = None) -> dict:
    return await kube.create(NODES, {"apiVersion": "v1", "kind": "Node",
                                     "metadata": {"name": name, "annotations": annotations or {},
                                                  "labels": {"fleetkeeper.io/e2e-machines": "true"}},
                                     "spec": {"providerID": pid}})


@pytest.fixture
async def nodes(kube):
    made: list[str] = []

    async def make(name, pid, annotations=None):
        obj = await make_node(kube, name, pid, annotations)
        made.append(name)
        return obj
    yield make
    for n in made:
        try:
            await kube.delete(NODES, n)
        except errors.NotFound:
            pass


async def test_cluster_api_deletes_exactly_the_owning_machine(kube, namespace, crds, nodes):
    t = secrets.token_hex(3)
    pid_a, pid_b = f"aws:///us-east-1a/i-0a{t}", f"aws:///us-east-1a/i-0b{t}"
    for name, pid in (("gpu-a", pid_a), ("gpu-b", pid_b)):
        await kube.create(MACHINES, capi_machine(name, namespace, pid), namespace)
    # a MachineSet with the schema's required fields is accepted too (the owner that would replace it)
    await kube.create(MACHINESETS, {
        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "MachineSet",
        "metadata": {"name": "gpu", "namespace": namespace},
        "spec": {"clusterName": "gpu", "replicas": 2, "selector": {"matchLabels": {"pool": "gpu"}},
                 "template": {"metadata": {"labels": {"pool": "gpu"}},
                              "spec": {"clusterName": "gpu", "bootstrap": {"dataSecretName": "b"},
                                       "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io",
                                                             "kind": "DockerMachineTemplate", "name": "gpu"}}}}},
        namespace)
    # the node's Cluster API annotation names gpu-a, but gpu-a runs another instance: the providerID decides
    node = await nodes(f"capi-{t}", pid_b, {CAPI_MACHINE_ANNOTATION: "gpu-a", CAPI_NAMESPACE_ANNOTATION: namespace})
    p = ClusterApiProvider(kube)
    m = Machine.from_node(node)
    assert (await p.find(m))["metadata"]["name"] == "gpu-b"
    # dry-run: the server validated the delete and kept both
    d = await p.terminate(m, dry_run=True)
    assert d.dry_run and "gpu-b" in d.message
    assert await kube.get_or_none(MACHINES, "gpu-b", namespace) is not None
    # remediate mode: the MachineHealthCheck annotation is accepted by the schema
    r = await ClusterApiProvider(kube, mode="remediate").terminate(m)
    assert CAPI_REMEDIATE_ANNOTATION in r.message
    got = await kube.get(MACHINES, "gpu-b", namespace)
    assert got["metadata"]["annotations"][CAPI_REMEDIATE_ANNOTATION] == ""
    out = await p.terminate(m)
    assert "deleted Machine" in out.message and "gpu-b" in out.message
    assert await kube.get_or_none(MACHINES, "gpu-b", namespace) is None
    assert await kube.get_or_none(MACHINES, "gpu-a", namespace) is not None
    assert await p.exists(m) is False
    assert (await p.terminate(m)).gone is True


async def test_karpenter_deletes_exactly_the_nodes_nodeclaim(kube, crds, nodes):
    t = secrets.token_hex(3)
    pids = {}
    for n in ("a", "b"):
        name = f"gpu-{n}-{t}"
        await kube.create(NODECLAIMS, nodeclaim(name))
        pids[n] = f"aws:///us-east-1a/i-0{n}{t}"
        # Karpenter writes the providerID into the NodeClaim's status (subresource)
        await kube.patch(NODECLAIMS, name, {"status": {"providerID": pids[n], "nodeName": f"kn-{n}-{t}"}},
                         subresource="status")
    try:
        node = await nodes(f"kn-b-{t}", pids["b"])
        p = KarpenterProvider(kube)
        m = Machine.from_node(node)
        assert (await p.find(m))["metadata"]["name"] == f"gpu-b-{t}"
        assert (await p.terminate(m, dry_run=True)).dry_run
        assert await kube.get_or_none(NODECLAIMS, f"gpu-b-{t}") is not None
        out = await p.replace(m)
        assert f"gpu-b-{t}" in out.message
        assert await kube.get_or_none(NODECLAIMS, f"gpu-b-{t}") is None
        assert await kube.get_or_none(NODECLAIMS, f"gpu-a-{t}") is not None
        assert await p.exists(m) is False
    finally:
        for n in ("a", "b"):
            try:
                await kube.delete(NODECLAIMS, f"gpu-{n}-{t}")
            except errors.NotFound:
                pass


def actuator(kube, namespace, provider, registry=None, recorder=None):
    cfg = load_config("max_per_hour: 2", "test")
    return MachineActuator(kube, provider, cfg, recorder or EventRecorder(kube, "machines", namespace=namespace),
                           RealClock(), registry or CollectorRegistry(), namespace)


async def test_machine_deleted_once_across_a_restart_and_hourly_limit_survives(kube, namespace, crds, nodes):
    t = secrets.token_hex(3)
    pid = f"aws:///us-east-1a/i-0c{t}"
    await kube.create(MACHINES, capi_machine("gpu-c", namespace, pid), namespace)
    node = await nodes(f"once-{t}", pid, {CAPI_MACHINE_ANNOTATION: "gpu-c", CAPI_NAMESPACE_ANNOTATION: namespace})
    uid = node["metadata"]["uid"]
    reg = CollectorRegistry()
    # the first process dies before its Events are written (a sink that holds none: every one is lost)
    dying = EventRecorder(kube, "machines", namespace=namespace, max_pending=0)
    first = actuator(kube, namespace, ClusterApiProvider(kube), reg, recorder=dying)
    step = await first.act("terminate", node["metadata"]["name"], "GPU lost", uid=uid)
    assert dying.counts["dropped"] >= 1 and dying.counts["created"] == 0
    assert step.fresh and step.kind == "waiting"  # Cluster API deletes the Node itself
    assert await kube.get_or_none(MACHINES, "gpu-c", namespace) is None
    cm = await kube.get(CONFIGMAPS, LEDGER_CONFIGMAP, namespace)
    entries = json.loads(cm["data"][KEY])
    assert [(e["machine"], e["uid"], e["action"], e["state"]) for e in entries] == [(pid, uid, "terminate", "done")]
    # a Machine with the same providerID shows up again (nothing has replaced the Node yet): a restarted
    # controller (new process: fresh memory) must not delete a second Machine for the same fault
    await kube.create(MACHINES, capi_machine("gpu-c2", namespace, pid), namespace)
    restarted = actuator(kube, namespace, ClusterApiProvider(kube))
    again = await restarted.act("terminate", node["metadata"]["name"], "GPU lost", uid=uid)
    assert not again.fresh and again.kind == "waiting"
    assert await kube.get_or_none(MACHINES, "gpu-c2", namespace) is not None
    # the outcome's Event, lost with the first process, is announced by the next; a third finds it written
    assert await restarted.recorder.flush(30) and restarted.recorder.counts["created"] == 1
    third = actuator(kube, namespace, ClusterApiProvider(kube))
    await third.act("terminate", node["metadata"]["name"], "GPU lost", uid=uid)
    assert await third.recorder.flush(30) and third.recorder.counts["existing"] == 1
    evs, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name={node['metadata']['name']}")
    assert [e["reason"] for e in evs].count("MachineTerminateStarted") == 1, [e["reason"] for e in evs]
    assert reg.get_sample_value("fleetkeeper_machine_actions_total",
                                {"provider": "cluster-api", "action": "terminate", "result": "success"}) == 1
    # the hourly limit (2) counts what the ledger holds, not what this process did
    for i in range(2):
        await kube.create(MACHINES, capi_machine(f"gpu-l{i}", namespace, f"aws:///us-east-1a/i-1{i}{t}"), namespace)
        n = await nodes(f"lim{i}-{t}", f"aws:///us-east-1a/i-1{i}{t}")
        act = actuator(kube, namespace, ClusterApiProvider(kube))
        s = await act.act("terminate", n["metadata"]["name"], "x")
        assert s.kind == ("waiting" if i == 0 else "limited"), s
        assert await act.recorder.flush(30)  # Events are written off the action's path: wait for them
    assert await kube.get_or_none(MACHINES, "gpu-l1", namespace) is not None
    evs, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name=lim1-{t}")
    assert any(e["reason"] == "MachineActionRateLimited" and "max_per_hour 2" in e["note"] for e in evs)


async def test_provider_errors_become_events_and_a_retry(kube, cluster, namespace, crds, nodes):
    """A provider refused by RBAC (forbidden) is a Warning Event and a Temporary error (the work queue
    retries after its delay), and nothing is recorded as done."""
    t = secrets.token_hex(3)
    pid = f"aws:///us-east-1a/i-0d{t}"
    await kube.create(MACHINES, capi_machine("gpu-d", namespace, pid), namespace)
    node = await nodes(f"forbid-{t}", pid, {CAPI_MACHINE_ANNOTATION: "gpu-d", CAPI_NAMESPACE_ANNOTATION: namespace})
    nobody = await Kube.connect(str(cluster.user_kubeconfig("mallory")))  # a user with no RBAC at all
    try:
        act = actuator(kube, namespace, ClusterApiProvider(nobody))
        with pytest.raises(errors.MachineForbidden) as exc:
            await act.act("terminate", node["metadata"]["name"], "GPU lost")
        assert isinstance(exc.value, errors.Temporary) and exc.value.delay >= 60
        assert await act.recorder.flush(30)  # Events are written off the action's path: wait for them
    finally:
        await nobody.close()
    assert await kube.get_or_none(MACHINES, "gpu-d", namespace) is not None
    cm = await kube.get_or_none(CONFIGMAPS, LEDGER_CONFIGMAP, namespace)
    assert not [e for e in json.loads(((cm or {}).get("data") or {}).get(KEY) or "[]") if e["machine"] == pid]
    evs, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name=forbid-{t}")
    failed = [e for e in evs if e["reason"] == "MachineActionFailed"]
    assert failed and "forbidden" in failed[0]["note"] and failed[0]["type"] == "Warning"
