"""Workload kinds the teams webhook admits, and where their pod templates sit.

A workload kind is configuration (``options.yaml`` key ``workloads``), with
shipped defaults for every built-in kind with a pod template and for the
training workloads research clusters run. A template path is dotted; a
segment ``*`` (or ``[*]``) matches every item of a list or every value of a
map, and a segment with ``*`` inside (``*ReplicaSpecs``) matches the map keys
it fits (shell-style). Each path names a PodTemplateSpec (``metadata`` +
``spec``); the empty path is the object itself (a Pod).
"""

from __future__ import annotations

import fnmatch
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetkeeper.core.resources import Resource

Path = tuple[str | int, ...]


class WorkloadKind(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    group: str = Field("", description="API group ('' for the core group)")
    version: str
    kind: str
    resource: str = Field(description="plural resource name, as in the webhook's rules")
    templates: tuple[str, ...] = Field(description="dotted paths to the kind's pod templates ('' = the object)")
    gang: bool = Field(False, description="the workload declares a gang (all-or-nothing) by default")

    @field_validator("templates")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one template path")
        for p in v:
            if p and not re.fullmatch(r"[A-Za-z0-9_*\[\]-]+(\.[A-Za-z0-9_*\[\]-]+)*", p):
                raise ValueError(f"template path {p!r}: dotted segments of letters, digits, '*' or '[*]'")
        return v

    def api_resource(self) -> Resource:
        return Resource(self.group, self.version, self.resource, self.kind, True)

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.kind)


def _k(group: str, version: str, kind: str, resource: str, *templates: str, gang: bool = False) -> WorkloadKind:
    return WorkloadKind(group=group, version=version, kind=kind, resource=resource, templates=templates, gang=gang)


DEFAULT_WORKLOADS: tuple[WorkloadKind, ...] = (
    _k("", "v1", "Pod", "pods", ""),
    _k("", "v1", "ReplicationController", "replicationcontrollers", "spec.template"),
    _k("apps", "v1", "Deployment", "deployments", "spec.template"),
    _k("apps", "v1", "ReplicaSet", "replicasets", "spec.template"),
    _k("apps", "v1", "StatefulSet", "statefulsets", "spec.template"),
    _k("apps", "v1", "DaemonSet", "daemonsets", "spec.template"),
    _k("batch", "v1", "Job", "jobs", "spec.template"),
    _k("batch", "v1", "CronJob", "cronjobs", "spec.jobTemplate.spec.template"),
    _k("", "v1", "PodTemplate", "podtemplates", "template"),
    _k("jobset.x-k8s.io", "v1alpha2", "JobSet", "jobsets", "spec.replicatedJobs[*].template.spec.template",
       gang=True),
    _k("kubeflow.org", "v2beta1", "MPIJob", "mpijobs", "spec.mpiReplicaSpecs.*.template", gang=True),
    _k("kubeflow.org", "v1", "MPIJob", "mpijobs", "spec.mpiReplicaSpecs.*.template", gang=True),
    _k("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs", "spec.pytorchReplicaSpecs.*.template", gang=True),
    _k("kubeflow.org", "v1", "TFJob", "tfjobs", "spec.tfReplicaSpecs.*.template", gang=True),
    _k("kubeflow.org", "v1", "XGBoostJob", "xgboostjobs", "spec.xgbReplicaSpecs.*.template", gang=True),
    _k("kubeflow.org", "v1", "PaddleJob", "paddlejobs", "spec.paddleReplicaSpecs.*.template", gang=True),
    _k("kubeflow.org", "v1", "JAXJob", "jaxjobs", "spec.jaxReplicaSpecs.*.template", gang=True),
    _k("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets",
       "spec.leaderWorkerTemplate.leaderTemplate", "spec.leaderWorkerTemplate.workerTemplate", gang=True),
    _k("ray.io", "v1", "RayCluster", "rayclusters", "spec.headGroupSpec.template",
       "spec.workerGroupSpecs[*].template"),
    _k("ray.io", "v1", "RayJob", "rayjobs", "spec.rayClusterSpec.headGroupSpec.template",
       "spec.rayClusterSpec.workerGroupSpecs[*].template", "spec.submitterPodTemplate"),
    _k("ray.io", "v1", "RayService", "rayservices", "spec.rayClusterConfig.headGroupSpec.template",
       "spec.rayClusterConfig.workerGroupSpecs[*].template"),
)


def segments(path: str) -> list[str]:
    return [s for s in path.replace("[*]", ".*").split(".") if s] if path else []


def find(obj: object, path: str) -> list[tuple[Path, dict]]:
    """Every dict in ``obj`` at ``path`` (wildcards expanded), with its concrete path."""
    out: list[tuple[Path, object]] = [((), obj)]
    for seg in segments(path):
        nxt: list[tuple[Path, object]] = []
        for p, cur in out:
            if isinstance(cur, list) and seg == "*":
                nxt += [((*p, i), v) for i, v in enumerate(cur)]
            elif isinstance(cur, dict):
                if "*" in seg:
                    nxt += [((*p, k), v) for k, v in cur.items() if fnmatch.fnmatchcase(str(k), seg)]
                elif seg in cur:
                    nxt.append(((*p, seg), cur[seg]))
        out = nxt
    return [(p, v) for p, v in out if isinstance(v, dict)]


def templates(kind: WorkloadKind, obj: dict) -> list[tuple[Path, dict]]:
    """The kind's pod templates in ``obj``: (path, PodTemplateSpec-like dict)."""
    seen: set[Path] = set()
    out = []
    for t in kind.templates:
        for p, v in find(obj, t):
            if p not in seen:
                seen.add(p)
                out.append((p, v))
    return out


def dig(obj: object, path: Path) -> object:
    cur = obj
    for p in path:
        if isinstance(cur, dict) and isinstance(p, str):
            cur = cur.get(p)
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]
        else:
            return None
    return cur


class WorkloadKinds:
    """Lookup of the configured kinds by (group, kind) and by resource."""

    def __init__(self, kinds: tuple[WorkloadKind, ...] | list[WorkloadKind] = DEFAULT_WORKLOADS):
        self.kinds = tuple(kinds)
        self._by_kind: dict[tuple[str, str], WorkloadKind] = {}
        for k in self.kinds:
            self._by_kind.setdefault(k.key, k)

    def get(self, group: str, kind: str) -> WorkloadKind | None:
        return self._by_kind.get((group, kind))

    def owner_resources(self) -> list[Resource]:
        """One resource per (group, kind) that can own other objects (not Pods)."""
        out, seen = [], set()
        for k in self.kinds:
            if k.kind in ("Pod", "PodTemplate") or k.key in seen:
                continue
            seen.add(k.key)
            out.append(k.api_resource())
        return out

    def rules(self, operations: list[str], pod_operations: list[str]) -> list[dict]:
        """Admission rules covering every configured kind (grouped by API group)."""
        groups: dict[str, tuple[set[str], set[str]]] = {}
        for k in self.kinds:
            if k.kind == "Pod":
                continue
            vs, rs = groups.setdefault(k.group, (set(), set()))
            vs.add(k.version)
            rs.add(k.resource)
        out = [{"apiGroups": [""], "apiVersions": ["v1"], "operations": pod_operations, "resources": ["pods"],
                "scope": "Namespaced"}]
        for g in sorted(groups):
            vs, rs = groups[g]
            out.append({"apiGroups": [g], "apiVersions": sorted(vs), "operations": operations,
                        "resources": sorted(rs), "scope": "Namespaced"})
        return out
