"""Which machine provider, and its limits: the ``machines.yaml`` key of the
``fleetkeeper-machines`` ConfigMap, a file, or the ``--machine-provider`` flag
of ``fleetkeeper run`` (the flag wins over the ConfigMap's ``provider``).

    provider: aws            # kubernetes-node (default) | cluster-api | karpenter | aws | gce | azure | command
    max_per_hour: 20         # machine actions (terminate, replace, reboot) per hour, fleet-wide
    max_per_day: 200
    aws: {region: us-east-1}
    gce: {}
    azure: {subscription_id: "..."}   # else the node's providerID's subscription
    command: {argv: [/usr/local/bin/machines], timeout: 120s}
    cluster_api: {mode: delete, namespace: default}
    kubernetes_node: {allow_real: false}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetkeeper.core import errors
from fleetkeeper.core.config import load_model, parse_yaml
from fleetkeeper.core.kube import Kube
from fleetkeeper.machines.base import MachineProvider

CONFIGMAP = "fleetkeeper-machines"
CONFIGMAP_KEY = "machines.yaml"
PROVIDERS = ("kubernetes-node", "cluster-api", "karpenter", "aws", "gce", "azure", "command")
ProviderName = Literal["kubernetes-node", "cluster-api", "karpenter", "aws", "gce", "azure", "command"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AwsConfig(_Strict):
    region: str | None = None
    endpoint_url: str | None = None  # a local emulator or a VPC endpoint


class GceConfig(_Strict):
    endpoint: str | None = None


class AzureConfig(_Strict):
    subscription_id: str = ""
    base_url: str | None = None


class CommandConfig(_Strict):
    argv: list[str] = Field(default_factory=list)
    timeout: float = Field(120.0, gt=0)
    deletes_node: bool = False

    @field_validator("argv", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        import shlex

        return shlex.split(v) if isinstance(v, str) else v


class ClusterApiConfig(_Strict):
    mode: Literal["delete", "remediate"] = "delete"
    namespace: str | None = None
    kubeconfig: str | None = None  # the management cluster, when it is not this one


class KubernetesNodeConfig(_Strict):
    allow_real: bool = False  # delete Node objects of real machines too (their VMs keep running)


class MachinesConfig(_Strict):
    provider: ProviderName = "kubernetes-node"
    max_per_hour: int = Field(20, ge=0)
    max_per_day: int = Field(200, ge=0)
    aws: AwsConfig = AwsConfig()
    gce: GceConfig = GceConfig()
    azure: AzureConfig = AzureConfig()
    command: CommandConfig = CommandConfig()
    cluster_api: ClusterApiConfig = ClusterApiConfig()
    kubernetes_node: KubernetesNodeConfig = KubernetesNodeConfig()


def load_config(text: str | None, source: str = "machines", *, provider: str | None = None) -> MachinesConfig:
    data = (parse_yaml(text, source) if text else None) or {}
    if provider:
        if provider not in PROVIDERS:
            raise errors.ConfigError("flags", [("--machine-provider", provider, f"expected one of {', '.join(PROVIDERS)}")])
        data = {**data, "provider": provider}
        if provider == "kubernetes-node":  # chosen explicitly: real machines' Nodes too
            data["kubernetes_node"] = {**(data.get("kubernetes_node") or {}), "allow_real": True}
    return load_model(MachinesConfig, data, source)


async def build_provider(cfg: MachinesConfig, kube: Kube) -> MachineProvider:
    """The configured provider. Cloud clients are imported only when chosen."""
    p = cfg.provider
    if p == "kubernetes-node":
        from fleetkeeper.machines.kube import KubernetesNodeProvider

        return KubernetesNodeProvider(kube, allow_real=cfg.kubernetes_node.allow_real)
    if p == "cluster-api":
        from fleetkeeper.machines.kube import ClusterApiProvider

        mk = kube
        if cfg.cluster_api.kubeconfig:
            mk = await Kube.connect(cfg.cluster_api.kubeconfig)
        return ClusterApiProvider(mk, mode=cfg.cluster_api.mode, namespace=cfg.cluster_api.namespace)
    if p == "karpenter":
        from fleetkeeper.machines.kube import KarpenterProvider

        return KarpenterProvider(kube)
    if p == "aws":
        from fleetkeeper.machines.aws import AwsProvider

        return AwsProvider(region=cfg.aws.region, endpoint_url=cfg.aws.endpoint_url)
    if p == "gce":
        from fleetkeeper.machines.gce import GceProvider

        return GceProvider(endpoint=cfg.gce.endpoint)
    if p == "azure":
        from fleetkeeper.machines.azure import AzureProvider

        return AzureProvider(subscription_id=cfg.azure.subscription_id, base_url=cfg.azure.base_url)
    from fleetkeeper.machines.command import CommandProvider

    if not cfg.command.argv:
        raise errors.ConfigError("machines", [("command.argv", [], "the command provider needs an executable")])
    return CommandProvider(cfg.command.argv, timeout=cfg.command.timeout, deletes_node=cfg.command.deletes_node)
