"""The teams ConfigMap: which nodes each team owns, who belongs to which team,
and which pods are low priority (and may borrow idle capacity).

The ConfigMap (default ``fleetkeeper-teams`` in ``fleetkeeper-system``) holds
one key, ``config.yaml``::

    teams:                        # (team, nodeSelector, count) tuples
      - team: team-a
        nodeSelector: {fleetkeeper.io/pool: gpu, topology.kubernetes.io/zone: zone-a}
        count: 100
    membership:                   # who is in which team (authenticated users and groups)
      team-a: {groups: [team-a], users: []}
    lowPriority: {below: 0}       # pods with spec.priority < 0 get the "any" toleration
    replacement: {maxNodes: 20, windowSeconds: 600}
    writes: {perSecond: 100, burst: 200, concurrency: 16}
    exempt: {users: [], groups: [system:masters, ...]}

Validation is complete and reports every problem with its field path, the bad
value and what is allowed (:class:`fleetkeeper.core.errors.ConfigError`). The
controller keeps the last good configuration when a new one is invalid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleetkeeper.core.config import load_model, parse_yaml
from fleetkeeper.core.errors import ConfigError

CONFIG_KEY = "config.yaml"
DEFAULT_CONFIGMAP = "fleetkeeper-teams"

# label values (a team name is used as a taint and label value): RFC 1123 label, <= 63
_TEAM_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)")
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# Label keys the shared node projection keeps (core.views.default_projector); a
# selector on any other key could never match, so it is refused up front.
VISIBLE_LABEL_PREFIXES = ("topology.kubernetes.io/", "node.kubernetes.io/", "kubernetes.io/hostname", "type",
                          "kwok.x-k8s.io/")


def valid_label_key(key: str) -> str | None:
    """None if ``key`` is a valid label key, else why not."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        return "the prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME_RE.fullmatch(name):
        return "the name must be 1-63 characters [A-Za-z0-9-_.], starting and ending alphanumeric"
    return None


class TeamEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    team: str = Field(description="team name; also the taint and label value")
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    count: int = Field(ge=0, le=100_000)

    @field_validator("team")
    @classmethod
    def _team(cls, v: str) -> str:
        if len(v) > 63 or not _TEAM_RE.fullmatch(v):
            raise ValueError("must be a lowercase RFC 1123 label (a-z, 0-9, '-'; at most 63 characters); "
                             "it becomes a taint and label value")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            why = valid_label_key(k)
            if why:
                raise ValueError(f"label key {k!r} is invalid: {why}")
            if len(val) > 63 or not _LABEL_VALUE_RE.fullmatch(val):
                raise ValueError(f"label value {val!r} of {k!r} is invalid: at most 63 characters "
                                 "[A-Za-z0-9-_.], starting and ending alphanumeric")
        return v


class Membership(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)


class LowPriority(BaseModel):
    model_config = ConfigDict(extra="forbid")

    below: int = Field(0, description="pods with spec.priority below this value are low priority")


class Replacement(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    max_nodes: int = Field(20, ge=0, alias="maxNodes",
                           description="at most this many unhealthy team nodes replaced per window")
    window_seconds: float = Field(600, gt=0, alias="windowSeconds")


class Writes(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    per_second: float = Field(100, gt=0, alias="perSecond")
    burst: int = Field(200, ge=1)
    concurrency: int = Field(16, ge=1, le=256)


class Exempt(BaseModel):
    """Requesters whose pods the webhook leaves alone (cluster admins, the
    built-in controllers that create pods from already-admitted templates)."""

    model_config = ConfigDict(extra="forbid")

    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=lambda: ["system:masters", "system:serviceaccounts:kube-system",
                                                        "system:serviceaccounts:fleetkeeper-system", "system:nodes"])


DEFAULT_CONTROLLERS = [
    # the service accounts the upstream manifests of the workload operators use
    "system:serviceaccount:jobset-system:jobset-controller-manager",
    "system:serviceaccount:mpi-operator:mpi-operator",
    "system:serviceaccount:kubeflow:training-operator",
    "system:serviceaccount:kubeflow-system:kubeflow-trainer-controller-manager",
    "system:serviceaccount:lws-system:lws-controller-manager",
    "system:serviceaccount:ray-system:kuberay-operator",
]


class Controllers(BaseModel):
    """Workload controllers (operators) whose objects are attributed to the
    requester stamped on their top-level owner, never to the controller."""

    model_config = ConfigDict(extra="forbid")

    users: list[str] = Field(default_factory=lambda: list(DEFAULT_CONTROLLERS))
    groups: list[str] = Field(default_factory=list)


class TeamsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    teams: list[TeamEntry] = Field(default_factory=list)
    membership: dict[str, Membership] = Field(default_factory=dict)
    low_priority: LowPriority = Field(default_factory=LowPriority, alias="lowPriority")
    replacement: Replacement = Field(default_factory=Replacement)
    writes: Writes = Field(default_factory=Writes)
    exempt: Exempt = Field(default_factory=Exempt)
    controllers: Controllers = Field(default_factory=Controllers)
    lifecycle_taint_keys: list[str] = Field(
        default_factory=list, alias="lifecycleTaintKeys",
        description="taint keys besides <domain>/* (except the team key) only exempt requesters may tolerate")

    @model_validator(mode="after")
    def _cross(self) -> "TeamsConfig":
        # membership keys must be team names too
        for team in self.membership:
            if len(team) > 63 or not _TEAM_RE.fullmatch(team):
                raise ValueError(f"membership key {team!r} is not a valid team name (lowercase RFC 1123 label)")
        # an entry whose team has no members is allowed (capacity reserved for later)
        seen: dict[tuple[str, tuple], int] = {}
        for i, e in enumerate(self.teams):
            k = (e.team, tuple(sorted(e.node_selector.items())))
            if k in seen:
                raise ValueError(f"teams[{i}] repeats teams[{seen[k]}] (same team and nodeSelector); "
                                 "merge them into one entry with the summed count")
            seen[k] = i
        return self

    # --- derived ---------------------------------------------------------
    @property
    def team_names(self) -> list[str]:
        out: list[str] = []
        for e in self.teams:
            if e.team not in out:
                out.append(e.team)
        for t in self.membership:
            if t not in out:
                out.append(t)
        return out

    def desired(self, team: str) -> int:
        return sum(e.count for e in self.teams if e.team == team)

    def teams_of(self, username: str, groups: tuple[str, ...] | list[str]) -> list[str]:
        """Teams the authenticated requester belongs to, in configuration order."""
        gs = set(groups)
        return [t for t, m in self.membership.items() if username in m.users or gs.intersection(m.groups)]

    def is_exempt(self, username: str, groups: tuple[str, ...] | list[str]) -> bool:
        return username in self.exempt.users or bool(set(groups).intersection(self.exempt.groups))

    def is_controller(self, username: str, groups: tuple[str, ...] | list[str]) -> bool:
        return username in self.controllers.users or bool(set(groups).intersection(self.controllers.groups))


def check_visible(cfg: TeamsConfig, domain: str) -> None:
    """Refuse selectors on label keys the shared node cache does not keep."""
    problems = []
    for i, e in enumerate(cfg.teams):
        for k in e.node_selector:
            if not (k.startswith(f"{domain}/") or k.startswith(VISIBLE_LABEL_PREFIXES)):
                problems.append((f"teams[{i}].nodeSelector.{k}", k,
                                 f"label key not visible to fleetkeeper; use a key under {domain}/, "
                                 "topology.kubernetes.io/, node.kubernetes.io/ or kubernetes.io/hostname"))
    if problems:
        raise ConfigError("teams", problems)


def parse_config(text: str, source: str, domain: str) -> TeamsConfig:
    data = parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", data, "expected a mapping with keys teams, membership, lowPriority, ...")])
    cfg = load_model(TeamsConfig, data, source)
    try:
        check_visible(cfg, domain)
    except ConfigError as exc:
        raise ConfigError(source, exc.problems) from None
    return cfg


def parse_configmap(cm: dict, domain: str) -> TeamsConfig:
    meta = cm.get("metadata") or {}
    source = f"configmap {meta.get('namespace', '')}/{meta.get('name', '')}"
    data = cm.get("data") or {}
    if CONFIG_KEY not in data:
        raise ConfigError(source, [(f"data.{CONFIG_KEY}", sorted(data), f"missing key {CONFIG_KEY!r}")])
    return parse_config(data[CONFIG_KEY], f"{source} key {CONFIG_KEY}", domain)


@dataclass
class ConfigState:
    """The configuration in force (last good) and the last error, shared by the
    controller and the webhook."""

    config: TeamsConfig | None = None
    resource_version: str = ""
    error: str = ""
    error_problems: list[tuple[str, Any, str]] = field(default_factory=list)
    error_resource_version: str = ""
    generation: int = 0  # bumped on every change, to wake watchers

    def accept(self, cfg: TeamsConfig, rv: str) -> None:
        self.config, self.resource_version = cfg, rv
        self.error, self.error_problems, self.error_resource_version = "", [], ""
        self.generation += 1

    def reject(self, exc: ConfigError, rv: str) -> None:
        self.error, self.error_problems, self.error_resource_version = str(exc), list(exc.problems), rv
        self.generation += 1
