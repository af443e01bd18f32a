"""Configuration of the relay and the join pacer.

``fleetkeeper run`` reads it from the ConfigMap ``fleetkeeper-relay``
(key ``config.yaml``) in fleetkeeper's namespace, or uses the defaults;
``fleetkeeper relay serve|pace`` take flags. Every problem is reported with
its field path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleetkeeper.core import errors
from fleetkeeper.core.config import load_model, parse_yaml
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.kube import Kube

CONFIGMAP = "fleetkeeper-relay"
CONFIG_KEY = "config.yaml"
TEAMS_CONFIGMAP = "fleetkeeper-teams"
_SA_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_DNS_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RelaySettings(_Strict):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="address to serve agents on")
    port: int = Field(8081, ge=0, le=65535)
    tls_cert: str | None = None
    tls_key: str | None = None
    auth: Literal["none", "tokenreview"] = "none"
    agent_service_accounts: list[str] = Field(default_factory=list, description="namespace:name")
    reader_groups: list[str] = Field(default_factory=list)
    audiences: list[str] = Field(default_factory=list)
    token_cache_seconds: float = Field(60.0, gt=0)
    history: int = Field(128, ge=1, le=100_000, description="events kept per node for resuming watches")
    buffer: int = Field(1024, ge=1, le=1_000_000, description="events queued per subscriber before it is dropped")
    bookmark_interval: float = Field(30.0, gt=0, le=600)
    watch_timeout: int = Field(300, ge=1, le=3600, description="longest watch before the agent reconnects")
    annotation_prefixes: list[str] = Field(default_factory=list, description="pod/node annotations kept "
                                           "(default: the fleetkeeper domain)")
    teams_configmap: str = TEAMS_CONFIGMAP
    # admission (docs/relay.md "Overload"): refuse early with 503 + Retry-After rather than fall behind
    max_inflight: int = Field(256, ge=1, le=100_000, description="agent requests answered at once before new "
                              "ones get 503 with Retry-After")
    max_lag: float = Field(5.0, gt=0, le=60, description="seconds the relay's event loop may run late before new "
                           "agent requests get 503 with Retry-After")
    expected_agents: int = Field(0, ge=0, le=1_000_000, description="agents this process should serve: at start "
                                 "the open-file limit is checked against it (one connection per agent, twice that "
                                 "while a fleet reconnects)")

    @field_validator("agent_service_accounts")
    @classmethod
    def _sas(cls, v: list[str]) -> list[str]:
        for sa in v:
            if not _SA_RE.match(sa):
                raise ValueError(f"{sa!r} is not namespace:name")
        return v

    @model_validator(mode="after")
    def _tls(self) -> "RelaySettings":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self


class TaintSpec(_Strict):
    key: str = Field(min_length=1, max_length=316)
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class BootstrapPod(_Strict):
    namespace: str | None = Field(None, description="default: fleetkeeper's namespace")
    name_prefix: str = "join-"
    image: str = "registry.k8s.io/pause:3.10"
    command: list[str] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_RE.match(v):
            raise ValueError("must be a DNS-1123 label")
        return v

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not re.fullmatch(r"[a-z0-9][-a-z0-9.]*", v):
            raise ValueError("must start a DNS subdomain (lower case, digits, '-', '.')")
        return v


class PacerSettings(_Strict):
    enabled: bool = False
    rate: float = Field(20.0, ge=0, description="nodes per second whose join work starts; 0 = unpaced")
    burst: int = Field(20, ge=1)
    workers: int = Field(8, ge=1, le=1000, description="join work in flight at once")
    node_selector: str = Field("", description="label selector of the nodes to handle")
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[TaintSpec] = Field(default_factory=list)
    bootstrap_pod: BootstrapPod | None = None


class RelayConfig(_Strict):
    relay: RelaySettings = RelaySettings()
    pacer: PacerSettings = PacerSettings()


def parse_config(text: str, source: str) -> RelayConfig:
    data = parse_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise errors.ConfigError(source, [("", data, "expected a mapping with 'relay' and/or 'pacer'")])
    return load_model(RelayConfig, data, source)


def _parse(text: str | None, source: str) -> RelayConfig:
    return RelayConfig() if text is None else parse_config(text, source)


def config_source(kube: Kube, namespace: str) -> ConfigMapKey[RelayConfig]:
    """The ConfigMap through the core loader: absent means the defaults (relay on, pacer off); present
    without the key, or invalid, is a ConfigError naming what is wrong."""
    return ConfigMapKey(kube, namespace, CONFIGMAP, CONFIG_KEY, _parse)


async def load_config(kube: Kube, namespace: str) -> RelayConfig:
    """The ConfigMap's configuration, or the defaults when there is none."""
    return await config_source(kube, namespace).load()
