"""Configuration of the capacity component: balloon pools and gang scheduling.

Loaded from the ConfigMap ``fleetkeeper-capacity`` (key ``config.yaml``) in the
manager's namespace when started by ``fleetkeeper run``, or from a file with
``fleetkeeper capacity ... --config``. Unknown keys are errors: a typo must not
silently fall back to a default.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleetkeeper.core.config import load_model, parse_yaml

CONFIGMAP_NAME = "fleetkeeper-capacity"
CONFIGMAP_KEY = "config.yaml"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class PoolConfig(BaseModel):
    """One node pool that balloons keep warm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="value of the pool label on the pool's nodes (gpu, cpu)")
    max_nodes: int | None = Field(None, ge=0, le=100_000,
                                  description="the pool's maximum size (cluster-autoscaler max); "
                                              "balloon replicas. None: the pool's current node count")
    resource: Literal["gpu", "cpu"] = Field("gpu", description="what a balloon pod takes from its node")
    gpus: int | None = Field(None, ge=1, le=64, description="GPUs per balloon; None: the pool nodes' allocatable")
    cpu_fraction: float = Field(0.9, gt=0, le=1.0,
                                description="share of a node's allocatable CPU a CPU balloon requests")
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError("must be a DNS label of at most 40 characters (it names the balloon Deployment)")
        return v


class BalloonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="false (then restart): the balloon Deployments fleetkeeper made are "
                                            "removed")
    namespace: str | None = Field(None, description="where balloon Deployments live; None: the manager's namespace")
    priority_class: str = Field("fleetkeeper-balloon-lowest",
                                description="its value is immutable: a new priority needs a new name")
    priority: int = Field(-1000, ge=-1_000_000_000, le=-1,
                          description="the lowest rung: below real work (0 and up), borrowers (teams' low "
                                      "priority, e.g. -100) and periodic test pods (-100), so all of them get a "
                                      "balloon's node; set cluster-autoscaler's --expendable-pods-priority-cutoff "
                                      "below it (e.g. -10000)")
    image: str = "registry.k8s.io/pause:3.10"
    tolerate_team_taints: bool = Field(True, description="balloons also keep teams' dedicated nodes warm")
    tolerations: list[dict[str, str]] = Field(
        default_factory=list, description="extra tolerations of balloon pods (e.g. nvidia.com/gpu:NoSchedule); "
                                          "never add the preflight or quarantine taints here")
    evict_per_minute: float = Field(60.0, gt=0, le=6000,
                                    description="rate limit for removing balloons from preflight/quarantined nodes")
    yield_to_waiting: bool = Field(True, description="release exactly the balloons that waiting work (a gang as "
                                                     "a unit) needs, in one step, instead of leaving it to "
                                                     "one-victim-at-a-time preemption")
    release_per_minute: float = Field(600.0, gt=0, le=100_000, description="rate limit for releasing balloons")
    release_burst: int = Field(512, ge=1, le=100_000,
                               description="balloons that may be released at once (a gang larger than this "
                                           "is served once the bucket is full)")
    pools: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig(name="gpu", resource="gpu"),
                                                             PoolConfig(name="cpu", resource="cpu")])

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict[str, str]]) -> list[dict[str, str]]:
        allowed = {"key", "operator", "value", "effect"}
        for t in v:
            extra = set(t) - allowed
            if extra:
                raise ValueError(f"unknown toleration field(s) {sorted(extra)}; allowed: {sorted(allowed)}")
            if t.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError("toleration operator must be Equal or Exists")
            if t.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise ValueError("toleration effect must be NoSchedule, PreferNoSchedule or NoExecute")
            if not t.get("key") and t.get("operator") != "Exists":
                raise ValueError("a toleration without a key must use operator Exists")
            if not t.get("key"):
                raise ValueError("a toleration that tolerates every taint would put balloons on "
                                 "preflight and quarantined nodes; name a key")
        return v

    @model_validator(mode="after")
    def _unique(self) -> "BalloonConfig":
        seen: set[str] = set()
        for p in self.pools:
            if p.name in seen:
                raise ValueError(f"pool {p.name!r} is listed twice")
            seen.add(p.name)
        return self


class GangConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="false (then restart): new pods are not made gangs (the webhook "
                                            "admits them unchanged, with a warning); gangs admitted before are "
                                            "finished as gangs, handed to kube-scheduler at once")
    backend: Literal["in-tree", "coscheduling", "both"] = Field(
        "in-tree", description="in-tree: scheduling.k8s.io/v1alpha2 Workload+PodGroup (kube-scheduler "
                               "GangScheduling); coscheduling: scheduling.x-k8s.io PodGroup (scheduler-plugins)")
    coscheduling_scheduler_name: str | None = Field(
        None, description="schedulerName set on gang pods for the coscheduling backend (None: leave as is)")
    schedule_timeout_seconds: int = Field(600, ge=10, le=86_400,
                                          description="coscheduling PodGroup scheduleTimeoutSeconds")
    bare_pod_settle_seconds: float = Field(
        5.0, ge=0, le=600, description="for pods without an owner or a min-members annotation: wait this long "
                                       "after the last member appears before fixing the gang size")
    workload_gangs: bool = Field(
        True, description="workloads that declare a gang (JobSet, MPIJob, PyTorchJob, LeaderWorkerSet) are gangs "
                          "by default: their member templates get the gang label and size on CREATE "
                          "(opt out per workload: annotation <domain>/gang-enabled: \"false\")")
    cleanup_grace_seconds: float = Field(30.0, ge=0, le=86_400,
                                         description="delete a gang's group objects this long after its last pod")
    reserve_after_seconds: float | None = Field(
        300.0, ge=1, le=86_400, description="a gang that fits its pool but has waited this long at the head of "
                                            "the pool's queue (the first of its waiting work: priority, then "
                                            "age) gets the nodes it needs reserved (taint + toleration), so "
                                            "smaller gangs stop taking them; None: never reserve")
    reserve_per_minute: float = Field(
        12.0, gt=0, le=10_000, description="rate limit for reservation steps: one step taints every node one "
                                           "gang's reservation needs, at once (or removes a reservation's "
                                           "taints); so at most this many x the nodes of the largest gang "
                                           "are tainted a minute")
    requeue_stuck_after_seconds: float | None = Field(
        20.0, ge=1, le=3600, description="a gang that fits its pool now but has stayed unplaced this long gets "
                                         "one requeue pod (never placed) that makes kube-scheduler try the whole "
                                         "group again (repairs the v1.36 gang stall, docs/capacity.md); keep it "
                                         "above the scheduler's podMaxBackoffSeconds; None: never")
    requeue_seconds_per_member: float = Field(
        0.05, ge=0, le=60, description="a gang also counts as stuck only once its members have shown no "
                                       "progress (none bound, no PodScheduled condition or nominated node "
                                       "changed) for requeue_stuck_after_seconds plus this much per member: "
                                       "kube-scheduler's cycle of a large group writes nothing until it binds")
    retry_when_room_frees_after_seconds: float | None = Field(
        2.0, ge=0, le=3600, description="a gang kube-scheduler found no room for, that fits now because room "
                                        "freed, gets one requeue pod this long after (once per time it starts "
                                        "to fit) so that it is tried at once, not when its backoff ends; "
                                        "None: never (only with requeue_stuck_after_seconds set)")
    requeue_per_minute: float = Field(60.0, gt=0, le=10_000, description="rate limit for requeue pods")
    hold_until_room_members: int | None = Field(
        1, ge=1, le=1_000_000, description="a gang of at least this many members (default: every gang) gets its "
                                           "PodGroup only once fleetkeeper's simulation places it whole on its "
                                           "pool in room no balloon is on (until then kube-scheduler's "
                                           "GangScheduling PreEnqueue keeps it out of the queue): a failed pod "
                                           "group cycle holds kube-scheduler's only scheduling thread (for a "
                                           "large gang a status PATCH per member, with SchedulerAsyncAPICalls "
                                           "off) and backs the gang off up to 10 s, so a gang tried while its "
                                           "room was still taken starts late (docs/capacity.md); a gang no pool "
                                           "takes is not held; None: never hold")
    gate_held_members: bool = Field(
        True, description="with the hold on, the gang webhook also puts a scheduling gate (<domain>/gang-hold) on "
                          "every gang member it admits, removed (one PATCH per member) once the gang is not held; "
                          "the PodGroup is created after the last gate is gone. Without the gate each new member's "
                          "arrival runs GangScheduling's PreEnqueue again for every gated sibling (quadratic in "
                          "the gang's size: 501,500 runs for a 1,000-member gang); a gated member is skipped at no "
                          "cost (docs/capacity.md)")
    expect_members_seconds: float | None = Field(
        30.0, ge=0, le=3600, description="a held gang whose size is known (its annotation, its Job's parallelism, "
                                         "...) counts as waiting work for the members it still lacks, for up to "
                                         "this long after its first member appeared: the pools' simulation gives "
                                         "it room in its turn (oldest first) while its members are created, "
                                         "instead of letting smaller gangs behind it take that room (a 1,000-pod "
                                         "job's members take seconds to create); None: a gang counts once all "
                                         "its members exist")
    hold_unjudged_seconds: float = Field(
        30.0, ge=0, le=3600, description="a held gang that no pool's simulation has judged this long after all "
                                         "its members exist (it asks for no pool fleetkeeper knows) gets its "
                                         "PodGroup anyway: kube-scheduler decides")
    webhook_port: int = Field(9445, ge=0, le=65535, description="0: any free port (local clusters)")
    webhook_host: str = "127.0.0.1"
    webhook_url: str | None = Field(None, description="URL the API server calls (local clusters); "
                                                      "None: register via the Service below")
    webhook_service: str = "fleetkeeper-capacity-webhook"
    webhook_cert_dir: str = Field("", description="a mounted serving certificate (tls.crt, tls.key, ca.crt) shared "
                                                  "by every replica and reloaded when it changes; empty: a "
                                                  "self-signed one made at start (local clusters)")
    manage_webhook_registration: bool = True


class CapacityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    balloons: BalloonConfig = BalloonConfig()
    gangs: GangConfig = GangConfig()
    resync_seconds: float = Field(60.0, ge=1, le=3600)

    @property
    def in_tree(self) -> bool:
        return self.gangs.backend in ("in-tree", "both")

    @property
    def coscheduling(self) -> bool:
        return self.gangs.backend in ("coscheduling", "both")


def load_config(data: Any, source: str) -> CapacityConfig:
    """Validate a parsed document (None or empty: defaults)."""
    return load_model(CapacityConfig, data or {}, source)


def load_config_text(text: str, source: str) -> CapacityConfig:
    return load_config(parse_yaml(text, source), source)
