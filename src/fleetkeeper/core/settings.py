"""Typed, grouped, documented settings of the controller manager."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from fleetkeeper.core.domain import DEFAULT_DOMAIN, SYSTEM_NAMESPACE


class LeaderElectionSettings(BaseModel):
    enabled: bool = True
    lease_name: str = "fleetkeeper-manager"
    lease_duration: float = Field(15.0, gt=0, description="seconds a lease is valid without renewal")
    renew_period: float = Field(5.0, gt=0, description="seconds between renewals")


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="/metrics, /healthz, /readyz")


class WebhookSettings(BaseModel):
    """The manager's one admission webhook server (every component's webhooks of this process)."""

    host: str | None = Field(None, description="bind address; None: the components' (a wildcard one wins)")
    port: int | None = Field(None, ge=0, le=65535, description="None: the components' (the first fixed one)")
    cert_dir: str | None = Field(None, description="tls.crt, tls.key (and ca.crt) of a mounted Secret; None: "
                                                   "the components' certificate, else a self-signed one")


class RuntimeSettings(BaseModel):
    """What every controller shares."""

    domain: str = Field(DEFAULT_DOMAIN, description="prefix of every label, taint and annotation")
    namespace: str = Field(SYSTEM_NAMESPACE, description="where fleetkeeper's own objects live")
    dry_run: bool = Field(False, description="decide and report, never write")
    kubeconfig: str | None = None
    context: str | None = Field(None, description="kubeconfig context (default: its current-context)")
    leader_election: LeaderElectionSettings = LeaderElectionSettings()
    server: ServerSettings = ServerSettings()
    webhook: WebhookSettings = WebhookSettings()
    controllers: list[str] = Field(default_factory=list)
    machine_provider: str | None = Field(None, description="the machine provider (fleetkeeper.machines.config); "
                                                           "None: the fleetkeeper-machines ConfigMap's, else "
                                                           "kubernetes-node")

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+", v):
            raise ValueError("must be a DNS subdomain such as example.com")
        return v
