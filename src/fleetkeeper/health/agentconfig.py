"""The node agent's configuration for a mixed fleet: one DaemonSet, one
ConfigMap (``fleetkeeper-health-agent``, key ``agent.yaml``, mounted into the
pod), and each agent works out its own settings from its Node:

    cloud: auto                 # auto (from the node's providerID) | azure | aws | gce | none
    default_gpus: 0             # expected GPUs of an instance type not listed (0: not checked)
    instance_types:             # node.kubernetes.io/instance-type -> expected GPUs
      Standard_ND96isr_H100_v5: {gpus: 8}
      p5.48xlarge: {gpus: 8}
      a3-highgpu-8g: {gpus: 8}
    thresholds: {disk_full_percent: 95}
    actions:                    # node-local actions (health.actions)
      enabled: true
      nvidia_smi: nvidia-smi
      reboot_command: [nsenter, -t, "1", -m, -u, -i, -n, --, systemctl, reboot]

The VM name that Azure Scheduled Events list in ``Resources`` is the VM's
name, not the Kubernetes node name: for a scale-set instance
``<scale set>_<instance id>`` (AKS names the node ``...vmss00000a`` but the
VM ``..._10``). It is taken from the providerID.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from fleetkeeper.core.config import load_model, parse_yaml
from fleetkeeper.machines.base import cloud_of, parse_azure

INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InstanceType(_Strict):
    gpus: int = Field(ge=0)


class Thresholds(_Strict):
    disk_full_percent: float = Field(95.0, ge=1, le=100)


class AgentActions(_Strict):
    enabled: bool = True
    nvidia_smi: str = "nvidia-smi"
    reboot_command: list[str] = Field(default_factory=lambda: ["nsenter", "-t", "1", "-m", "-u", "-i", "-n", "--",
                                                               "systemctl", "reboot"], min_length=1)
    state_file: str = "/var/lib/fleetkeeper/agent-actions.json"


class AgentConfig(_Strict):
    cloud: str = Field("auto", pattern="^(auto|azure|aws|gce|none)$")
    default_gpus: int = Field(0, ge=0)
    instance_types: dict[str, InstanceType] = Field(default_factory=dict)
    thresholds: Thresholds = Thresholds()
    actions: AgentActions = AgentActions()


def load_agent_config(text: str | None, source: str = "agent config") -> AgentConfig:
    data = (parse_yaml(text, source) if text else None) or {}
    return load_model(AgentConfig, data, source)


@dataclass(frozen=True)
class NodeSettings:
    cloud: str  # azure | aws | gce | none
    expected_gpus: int
    vm_name: str  # the name the cloud's maintenance events use
    instance_type: str
    full_percent: float


def resolve(cfg: AgentConfig, node: dict) -> NodeSettings:
    """This node's settings, from the configuration and its Node object (providerID, labels)."""
    meta, spec = node.get("metadata") or {}, node.get("spec") or {}
    labels = meta.get("labels") or {}
    pid = spec.get("providerID", "")
    cloud = cfg.cloud if cfg.cloud != "auto" else (cloud_of(pid) or "none")
    itype = next((labels[k] for k in INSTANCE_TYPE_LABELS if labels.get(k)), "")
    it = cfg.instance_types.get(itype)
    gpus = it.gpus if it is not None else cfg.default_gpus
    az = parse_azure(pid)
    vm = az.vm_name if az else meta.get("name", "")
    return NodeSettings(cloud, gpus, vm, itype, cfg.thresholds.disk_full_percent)
