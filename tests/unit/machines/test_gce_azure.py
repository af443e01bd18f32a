"""The gce and azure providers: their official Python clients against a local HTTP
server answering with recorded response shapes; the tests check method, path and body."""

from __future__ import annotations

import time

import pytest
from azure.core.credentials import AccessToken
from google.auth.credentials import AnonymousCredentials

from fleetkeeper.core import errors
from fleetkeeper.machines.azure import AzureProvider
from fleetkeeper.machines.base import Machine
from fleetkeeper.machines.gce import GceProvider

# --- GCE ------------------------------------------------------------------------------

P, Z = "research", "us-central1-a"
INST = f"/compute/v1/projects/{P}/zones/{Z}/instances"
MIG = f"/compute/v1/projects/{P}/zones/{Z}/instanceGroupManagers/gpu-a3"


def gce_instance(name: str, mig: bool = True, status: str = "RUNNING") -> dict:
    items = [{"key": "created-by", "value": f"projects/123456/zones/{Z}/instanceGroupManagers/gpu-a3"}] if mig else []
    return {"kind": "compute#instance", "id": "4242", "name": name, "zone": f"projects/{P}/zones/{Z}",
            "status": status, "machineType": f"zones/{Z}/machineTypes/a3-highgpu-8g",
            "metadata": {"kind": "compute#metadata", "fingerprint": "x", "items": items},
            "selfLink": f"https://www.googleapis.com/compute/v1/projects/{P}/zones/{Z}/instances/{name}"}


def gce_op(kind: str, target: str) -> dict:
    return {"kind": "compute#operation", "id": "77", "name": f"operation-{kind}-1", "operationType": kind,
            "status": "RUNNING", "targetLink": target, "zone": f"projects/{P}/zones/{Z}", "progress": 0}


def gm(name: str) -> Machine:
    return Machine(f"node-{name}", "uid", f"gce://{P}/{Z}/{name}")


@pytest.fixture
def gce(recorder):
    p = GceProvider(endpoint=recorder.url, credentials=AnonymousCredentials())
    yield p
    p.close()


async def test_gce_terminate_in_mig_deletes_that_instance(gce, recorder):
    recorder.route("GET", f"{INST}/gpu-a3-7x2k", 200, gce_instance("gpu-a3-7x2k"))
    recorder.route("POST", f"{MIG}/deleteInstances", 200, gce_op("deleteInstances", MIG))
    out = await gce.terminate(gm("gpu-a3-7x2k"))
    assert "deleteInstances" in out.message and "operation-deleteInstances-1" in out.message
    posts = recorder.calls("POST")
    assert [(m, p.split("?")[0]) for m, p, _ in posts] == [("POST", f"{MIG}/deleteInstances")]
    assert posts[0][2] == {"instances": [f"projects/{P}/zones/{Z}/instances/gpu-a3-7x2k"]}


async def test_gce_replace_recreates_and_reboot_resets(gce, recorder):
    recorder.route("GET", f"{INST}/gpu-a3-1", 200, gce_instance("gpu-a3-1"))
    recorder.route("POST", f"{MIG}/recreateInstances", 200, gce_op("recreateInstances", MIG))
    recorder.route("POST", f"{INST}/gpu-a3-1/reset", 200, gce_op("reset", f"{INST}/gpu-a3-1"))
    await gce.replace(gm("gpu-a3-1"))
    await gce.reboot(gm("gpu-a3-1"))
    posts = [(p.split("?")[0], b) for _, p, b in recorder.calls("POST")]
    assert posts[0] == (f"{MIG}/recreateInstances", {"instances": [f"projects/{P}/zones/{Z}/instances/gpu-a3-1"]})
    assert posts[1][0] == f"{INST}/gpu-a3-1/reset" and len(posts) == 2


async def test_gce_outside_a_mig_and_dry_run(gce, recorder):
    recorder.route("GET", f"{INST}/solo", 200, gce_instance("solo", mig=False))
    recorder.route("DELETE", f"{INST}/solo", 200, gce_op("delete", f"{INST}/solo"))
    d = await gce.terminate(gm("solo"), dry_run=True)
    assert d.dry_run and not recorder.calls("DELETE") and not recorder.calls("POST")
    with pytest.raises(errors.MachineUnsupported):
        await gce.replace(gm("solo"))
    await gce.terminate(gm("solo"))
    assert [p.split("?")[0] for _, p, _ in recorder.calls("DELETE")] == [f"{INST}/solo"]
    assert not recorder.calls("POST")


async def test_gce_errors(gce, recorder):
    # 404: already gone (no delete call); 429: throttled; 403: forbidden
    assert (await gce.terminate(gm("gone"))).gone is True and not recorder.calls("POST")
    assert await gce.exists(gm("gone")) is False
    recorder.route("GET", f"{INST}/busy", 429, {"error": {"code": 429, "message": "Rate Limit Exceeded",
                                                          "status": "RESOURCE_EXHAUSTED"}})
    with pytest.raises(errors.MachineThrottled):
        await gce.terminate(gm("busy"))
    recorder.route("GET", f"{INST}/locked", 200, gce_instance("locked"))
    recorder.route("POST", f"{MIG}/deleteInstances", 403, {"error": {"code": 403, "message": "Required "
                   "'compute.instanceGroupManagers.update' permission", "status": "PERMISSION_DENIED"}})
    with pytest.raises(errors.MachineForbidden, match="compute.instanceGroupManagers.update"):
        await gce.terminate(gm("locked"))


# --- Azure ------------------------------------------------------------------------------

SUB, RG = "00000000-0000-0000-0000-000000000001", "rg-gpu"
VMSS = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/ndv5"


class StaticToken:
    def get_token(self, *scopes, **kw):
        return AccessToken("test-token", int(time.time()) + 3600)


def vmss_vm(iid: str, state: str = "Succeeded") -> dict:
    return {"name": f"ndv5_{iid}", "instanceId": iid, "id": f"{VMSS}/virtualMachines/{iid}", "location": "eastus",
            "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
            "sku": {"name": "Standard_ND96isr_H100_v5", "tier": "Standard"},
            "properties": {"latestModelApplied": True, "vmId": "2f0e", "provisioningState": state,
                           "osProfile": {"computerName": f"ndv5{iid:0>6}"}}}


def am(iid: str) -> Machine:
    return Machine(f"aks-ndv5-{iid}", "uid", f"azure://{VMSS}/virtualMachines/{iid}")


@pytest.fixture
def azure(recorder):
    p = AzureProvider(credential=StaticToken(), base_url=recorder.url)
    yield p
    p.close()


async def test_azure_vmss_delete_restart_reimage(azure, recorder):
    recorder.route("GET", f"{VMSS}/virtualMachines/3", 200, vmss_vm("3"))
    recorder.route("DELETE", f"{VMSS}/virtualMachines/3", 202, None,
                   {"Azure-AsyncOperation": f"{recorder.url}/op/1", "Location": f"{recorder.url}/op/1"})
    recorder.route("POST", f"{VMSS}/virtualMachines/3/restart", 202, None, {"Location": f"{recorder.url}/op/2"})
    recorder.route("POST", f"{VMSS}/virtualMachines/3/reimage", 202, None, {"Location": f"{recorder.url}/op/3"})
    out = await azure.terminate(am("3"))
    assert "delete of scale-set instance ndv5/3 accepted" in out.message
    await azure.reboot(am("3"))
    await azure.reimage(am("3"))
    writes = [(m, p.split("?")[0]) for m, p, _ in recorder.requests if m != "GET"]
    assert writes == [("DELETE", f"{VMSS}/virtualMachines/3"), ("POST", f"{VMSS}/virtualMachines/3/restart"),
                      ("POST", f"{VMSS}/virtualMachines/3/reimage")]
    assert all("api-version=" in p for _, p, _ in recorder.requests)
    assert not [r for r in recorder.requests if "/op/" in r[1]]  # started, not waited for


async def test_azure_dry_run_gone_and_errors(azure, recorder):
    recorder.route("GET", f"{VMSS}/virtualMachines/4", 200, vmss_vm("4"))
    d = await azure.terminate(am("4"), dry_run=True)
    assert d.dry_run and [m for m, _, _ in recorder.requests] == ["GET"]
    recorder.route("GET", f"{VMSS}/virtualMachines/5", 404, {"error": {"code": "NotFound", "message": "gone"}})
    assert (await azure.terminate(am("5"))).gone is True
    assert await azure.exists(am("5")) is False
    recorder.route("GET", f"{VMSS}/virtualMachines/6", 200, vmss_vm("6", "Deleting"))
    assert await azure.exists(am("6")) is False
    recorder.route("GET", f"{VMSS}/virtualMachines/7", 200, vmss_vm("7"))
    recorder.route("DELETE", f"{VMSS}/virtualMachines/7", 429,
                   {"error": {"code": "TooManyRequests", "message": "throttled"}}, {"Retry-After": "17"})
    with pytest.raises(errors.MachineThrottled) as exc:
        await azure.terminate(am("7"))
    assert exc.value.delay == 17.0
    recorder.route("GET", f"{VMSS}/virtualMachines/8", 403,
                   {"error": {"code": "AuthorizationFailed", "message": "does not have authorization to perform "
                              "action 'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read'"}})
    with pytest.raises(errors.MachineForbidden, match="AuthorizationFailed|authorization"):
        await azure.terminate(am("8"))
