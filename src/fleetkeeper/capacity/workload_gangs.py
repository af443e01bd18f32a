"""Gangs declared by the workload itself (JobSet, MPIJob, PyTorchJob and the
other Kubeflow jobs, LeaderWorkerSet).

Such a workload says how many pods must run together, so it is a gang by
default (opt out with the annotation ``<domain>/gang-enabled: "false"`` on the
workload). On the workload's CREATE, capacity's webhook puts the gang label
``<domain>/gang=<name>`` and the size ``<domain>/gang-min-members=<n>`` on
every member template; the controllers copy them onto every pod, so the gang
controller knows each pod's gang and its size from its first member: no
settle timer, no owner lookup.

Sizes:

* JobSet: sum over replicatedJobs of ``replicas x min(parallelism, completions)``;
* MPIJob: launcher + workers (workers only when the launcher is created after
  the workers are ready, ``launcherCreationPolicy: WaitForWorkersReady``, or it
  would wait for a gang that waits for it);
* PyTorchJob, TFJob, XGBoostJob, PaddleJob, JAXJob: the sum of every
  replica type's ``replicas``;
* LeaderWorkerSet: ``size`` (leader + workers) per group, times ``replicas``:
  every group of one LeaderWorkerSet joins one gang (the gang label is per
  template, and a template serves every group), so with ``replicas > 1`` the
  gang is stricter than one group.

Pure functions; :func:`mutate_workload` is the admission handler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fleetkeeper.core.domain import Names
from fleetkeeper.core.admission import Admission, AdmissionRequest, json_patch_path

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# (group, kind) -> resource, for the webhook's rules
GANG_KINDS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("jobset.x-k8s.io", "JobSet"): (("v1alpha2",), "jobsets"),
    ("kubeflow.org", "MPIJob"): (("v2beta1", "v1"), "mpijobs"),
    ("kubeflow.org", "PyTorchJob"): (("v1",), "pytorchjobs"),
    ("kubeflow.org", "TFJob"): (("v1",), "tfjobs"),
    ("kubeflow.org", "XGBoostJob"): (("v1",), "xgboostjobs"),
    ("kubeflow.org", "PaddleJob"): (("v1",), "paddlejobs"),
    ("kubeflow.org", "JAXJob"): (("v1",), "jaxjobs"),
    ("leaderworkerset.x-k8s.io", "LeaderWorkerSet"): (("v1",), "leaderworkersets"),
}
REPLICA_SPECS = {"MPIJob": "mpiReplicaSpecs", "PyTorchJob": "pytorchReplicaSpecs", "TFJob": "tfReplicaSpecs",
                 "XGBoostJob": "xgbReplicaSpecs", "PaddleJob": "paddleReplicaSpecs", "JAXJob": "jaxReplicaSpecs"}

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class WorkloadGang:
    name: str                 # the gang (and PodGroup) name
    size: int                 # minimum members placed together
    members: tuple[Path, ...]  # paths of the member templates (PodTemplateSpec)
    source: str               # how the size was computed, for Events and explain


def _int(v: object, default: int) -> int:
    try:
        return int(v) if v is not None else default  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def gang_name(kind: str, name: str) -> str:
    """A DNS label naming the gang of workload ``kind/name``."""
    base = re.sub(r"[^a-z0-9-]", "-", f"{kind.lower()}-{name.lower()}")[:63].strip("-")
    return base or kind.lower()


def workload_gang(group: str, kind: str, obj: dict) -> WorkloadGang | None:
    """The gang a workload declares, or None (not a gang kind, or it declares no size)."""
    if (group, kind) not in GANG_KINDS:
        return None
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    name = gang_name(kind, meta.get("name") or meta.get("generateName") or "gang")
    if kind == "JobSet":
        size, members, parts = 0, [], []
        for i, rj in enumerate(spec.get("replicatedJobs") or ()):
            js = ((rj.get("template") or {}).get("spec") or {})
            par = _int(js.get("parallelism"), 1)
            comp = js.get("completions")
            per = min(par, _int(comp, par)) if comp is not None else par
            n = _int(rj.get("replicas"), 1) * per
            size += n
            members.append(("spec", "replicatedJobs", i, "template", "spec", "template"))
            parts.append(f"{rj.get('name', i)} {_int(rj.get('replicas'), 1)}x{per}")
        return WorkloadGang(name, size, tuple(members), "JobSet " + " + ".join(parts)) if size else None
    if kind in REPLICA_SPECS:
        key = REPLICA_SPECS[kind]
        specs = spec.get(key) or {}
        skip_launcher = kind == "MPIJob" and spec.get("launcherCreationPolicy") == "WaitForWorkersReady"
        size, members, parts = 0, [], []
        for role, rs in specs.items():
            if not isinstance(rs, dict) or not isinstance(rs.get("template"), dict):
                continue
            if skip_launcher and role == "Launcher":
                continue
            n = _int(rs.get("replicas"), 1)
            size += n
            members.append(("spec", key, role, "template"))
            parts.append(f"{role} {n}")
        return WorkloadGang(name, size, tuple(members), f"{kind} " + " + ".join(parts)) if size else None
    if kind == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate") or {}
        group_size = _int(lwt.get("size"), 1)
        replicas = _int(spec.get("replicas"), 1)
        members = [("spec", "leaderWorkerTemplate", t) for t in ("leaderTemplate", "workerTemplate")
                   if isinstance(lwt.get(t), dict)]
        return WorkloadGang(name, group_size * replicas, tuple(members),
                            f"LeaderWorkerSet {replicas} group(s) of {group_size}")
    return None


def opted_out(obj: dict, names: Names) -> bool:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    return str(ann.get(names.gang_opt_out, "")).lower() == "false"


def _dig(obj: object, path: Path) -> object:
    cur = obj
    for p in path:
        cur = cur.get(p) if isinstance(cur, dict) and isinstance(p, str) else (
            cur[p] if isinstance(cur, list) and isinstance(p, int) and p < len(cur) else None)
    return cur


def template_patch(obj: dict, gang: WorkloadGang, names: Names) -> list[dict]:
    """RFC 6902 ops putting the gang label and size on every member template
    (a template that already names a gang keeps it: the author chose)."""
    ops: list[dict] = []
    for path in gang.members:
        t = _dig(obj, path)
        if not isinstance(t, dict):
            continue
        p = tuple(str(x) for x in path)
        meta = t.get("metadata")
        if not isinstance(meta, dict):
            ops.append({"op": "add", "path": json_patch_path(*p, "metadata"),
                        "value": {"labels": {names.gang: gang.name}, "annotations": {names.gang_min: str(gang.size)}}})
            continue
        labels, ann = meta.get("labels"), meta.get("annotations")
        if isinstance(labels, dict) and labels.get(names.gang):
            continue
        if isinstance(labels, dict):
            ops.append({"op": "add", "path": json_patch_path(*p, "metadata", "labels", names.gang), "value": gang.name})
        else:
            ops.append({"op": "add", "path": json_patch_path(*p, "metadata", "labels"), "value": {names.gang: gang.name}})
        if isinstance(ann, dict):
            ops.append({"op": "add", "path": json_patch_path(*p, "metadata", "annotations", names.gang_min),
                        "value": str(gang.size)})
        else:
            ops.append({"op": "add", "path": json_patch_path(*p, "metadata", "annotations"),
                        "value": {names.gang_min: str(gang.size)}})
    return ops


def mutate_workload(req: AdmissionRequest, names: Names) -> Admission:
    """Workload CREATE: make a workload that declares a gang one gang (pure)."""
    if req.operation != "CREATE":
        return Admission()
    if opted_out(req.obj, names):
        return Admission()
    gang = workload_gang(req.group, req.kind, req.obj)
    if gang is None:
        return Admission()
    if not _DNS_LABEL.match(gang.name):
        return Admission(warnings=[f"gang name {gang.name!r} is not a DNS label; not made a gang"])
    return Admission(True, patch=template_patch(req.obj, gang, names))


def webhook_rules() -> list[dict]:
    groups: dict[str, tuple[set[str], set[str]]] = {}
    for (g, _), (versions, res) in GANG_KINDS.items():
        vs, rs = groups.setdefault(g, (set(), set()))
        vs.update(versions)
        rs.add(res)
    return [{"operations": ["CREATE"], "apiGroups": [g], "apiVersions": sorted(vs), "resources": sorted(rs),
             "scope": "Namespaced"} for g, (vs, rs) in sorted(groups.items())]
