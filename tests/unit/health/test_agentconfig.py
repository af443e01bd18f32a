"""One agent configuration for a mixed fleet (two instance types, two clouds); Azure Scheduled
Events matched by the VM's name (scale-set instance), not the node's."""

from __future__ import annotations

import pytest

from fleetkeeper.core.errors import ConfigError
from fleetkeeper.health.agentconfig import load_agent_config, resolve
from fleetkeeper.health.cloud import parse_azure

CONFIG = """
cloud: auto
default_gpus: 0
instance_types:
  Standard_ND96isr_H100_v5: {gpus: 8}
  p4de.24xlarge: {gpus: 8}
  Standard_NC24ads_A100_v4: {gpus: 1}
thresholds: {disk_full_percent: 90}
"""
VMSS = ("azure:///subscriptions/s/resourceGroups/MC_rg_aks_eastus/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/aks-ndv5-12345678-vmss/virtualMachines/10")


def node(name, pid, itype):
    return {"metadata": {"name": name, "labels": {"node.kubernetes.io/instance-type": itype}},
            "spec": {"providerID": pid}}


def test_mixed_fleet_from_one_config():
    cfg = load_agent_config(CONFIG, "configmap fleetkeeper-health-agent")
    az = resolve(cfg, node("aks-ndv5-12345678-vmss00000a", VMSS, "Standard_ND96isr_H100_v5"))
    assert (az.cloud, az.expected_gpus, az.vm_name, az.full_percent) == \
        ("azure", 8, "aks-ndv5-12345678-vmss_10", 90.0)
    small = resolve(cfg, node("aks-nc-0", VMSS.replace("aks-ndv5-12345678-vmss", "aks-nc-vmss"),
                              "Standard_NC24ads_A100_v4"))
    assert (small.cloud, small.expected_gpus) == ("azure", 1)
    aws = resolve(cfg, node("ip-10-0-1-5.ec2.internal", "aws:///us-east-1a/i-0abc", "p4de.24xlarge"))
    assert (aws.cloud, aws.expected_gpus, aws.vm_name) == ("aws", 8, "ip-10-0-1-5.ec2.internal")
    unknown = resolve(cfg, node("kwok-1", "kwok://kwok-1", "kwok.small"))
    assert (unknown.cloud, unknown.expected_gpus) == ("none", 0)
    forced = resolve(load_agent_config("cloud: gce"), node("x", "aws:///z/i-1", ""))
    assert forced.cloud == "gce"


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="instance_types.p5.gpus"):
        load_agent_config("instance_types: {p5: {gpus: -1}}", "configmap x")
    with pytest.raises(ConfigError, match="cloud"):
        load_agent_config("cloud: openstack")


def test_azure_events_match_the_scale_set_vm_name_not_the_node_name():
    doc = {"DocumentIncarnation": 3, "Events": [
        {"EventId": "A", "EventType": "Reboot", "ResourceType": "VirtualMachine", "EventStatus": "Scheduled",
         "Resources": ["aks-ndv5-12345678-vmss_10"], "NotBefore": "Mon, 30 Nov 2026 12:00:00 GMT",
         "EventSource": "Platform", "Description": "host update"}]}
    cfg = load_agent_config(CONFIG)
    me = resolve(cfg, node("aks-ndv5-12345678-vmss00000a", VMSS, "Standard_ND96isr_H100_v5"))
    assert parse_azure(doc, me.vm_name).problem is True
    # matching on the Kubernetes node name (what the agent did before) misses the event
    assert parse_azure(doc, "aks-ndv5-12345678-vmss00000a").problem is False
    other = resolve(cfg, node("aks-ndv5-12345678-vmss00000b", VMSS.replace("/10", "/11"), "x"))
    assert parse_azure(doc, other.vm_name).problem is False
