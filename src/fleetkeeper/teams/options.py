"""How the teams component is deployed (not team policy: that is the ConfigMap).

``setup(mgr, None)`` (``fleetkeeper run``) reads these from the optional key
``options.yaml`` of the teams ConfigMap, else uses the defaults below, which
suit the local control plane: a self-signed certificate, a webhook on
127.0.0.1 registered by URL, unregistered on exit. In a real cluster set
``webhook.service`` (and usually ``webhook.cert``/``key``/``caBundle`` from
cert-manager, ``host: 0.0.0.0``, ``port: 9443``; a Service-registered webhook is never
unregistered by a stopping process). The Helm chart owns the configurations itself
(``register: false``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetkeeper.teams.config import DEFAULT_CONFIGMAP
from fleetkeeper.teams.workloads import DEFAULT_WORKLOADS, WorkloadKind

OPTIONS_KEY = "options.yaml"


class WebhookOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = True
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(0, ge=0, le=65535, description="0: any free port (local only)")
    url_host: str | None = Field(None, alias="urlHost", description="host in the registered URL (default: host)")
    service: str | None = Field(None, description="register by Service: NAMESPACE/NAME[:PORT] (production)")
    cert: str | None = None
    key: str | None = None
    ca_bundle: str | None = Field(None, alias="caBundle", description="PEM file of the CA that signed cert")
    cert_dir: str | None = Field(None, alias="certDir", description="where self-signed certificates are written")
    register_webhook: bool = Field(True, alias="register")
    unregister_on_exit: bool | None = Field(
        None, alias="unregisterOnExit",
        description="delete the webhook configurations when this process stops (default: only when registered "
                    "by URL, i.e. a local single process; never when registered by Service, where another "
                    "replica still serves and a stopping pod must not open an unguarded window)")

    @property
    def unregisters_on_exit(self) -> bool:
        if self.unregister_on_exit is not None:
            return self.unregister_on_exit
        return not self.service
    config_name: str = Field("fleetkeeper-teams", alias="configName")
    mutating_failure_policy: Literal["Ignore", "Fail"] = Field("Ignore", alias="mutatingFailurePolicy")
    validating_failure_policy: Literal["Ignore", "Fail"] = Field("Fail", alias="validatingFailurePolicy")
    timeout_seconds: int = Field(2, ge=1, le=30, alias="timeoutSeconds")
    namespace_labels: dict[str, str] = Field(default_factory=dict, alias="namespaceLabels",
                                             description="only namespaces with these labels (empty: all)")
    exclude_namespaces: list[str] = Field(default_factory=lambda: ["kube-system"], alias="excludeNamespaces",
                                          description="never admitted (fleetkeeper's own namespace is added)")
    workloads: bool = Field(True, description="also admit pod templates of Deployments, Jobs, ...")
    skip_groups: list[str] = Field(default_factory=lambda: ["system:serviceaccounts:kube-system", "system:nodes"],
                                   alias="skipGroups",
                                   description="requests from these groups never reach the webhook (matchConditions): "
                                               "the built-in controllers create pods from templates already admitted")


class TeamsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    configmap: str = DEFAULT_CONFIGMAP
    config_namespace: str | None = Field(None, alias="configNamespace", description="default: the manager's")
    status_configmap: str = Field("fleetkeeper-teams-status", alias="statusConfigMap")
    resync_seconds: float = Field(60, gt=0, alias="resyncSeconds")
    webhook: WebhookOptions = Field(default_factory=WebhookOptions)
    workloads: list[WorkloadKind] = Field(
        default_factory=lambda: list(DEFAULT_WORKLOADS),
        description="kinds the webhook admits and where their pod templates sit; replaces the defaults")
    owner_wait_seconds: float = Field(1.0, ge=0, le=10, alias="ownerWaitSeconds",
                                      description="how long an object created by a controller waits for its "
                                                  "owner to reach fleetkeeper's cache; after that the owner "
                                                  "is read from the API server")
