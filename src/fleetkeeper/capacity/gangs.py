"""Gang scheduling: pure decisions.

How a pod joins a gang in Kubernetes 1.36 (kube-scheduler feature gates
GenericWorkload + GangScheduling, API scheduling.k8s.io/v1alpha2):

* the pod names its group in ``spec.schedulingGroup.podGroupName``; the field
  is immutable, so it must be set when the pod is created. fleetkeeper's
  mutating webhook (:func:`mutate_pod`) sets it from the pod's
  ``<domain>/gang`` label, so researchers write nothing extra;
* the group is a ``PodGroup`` with ``spec.schedulingPolicy.gang.minCount``;
  until it exists and ``minCount`` members exist, the scheduler's
  GangScheduling PreEnqueue keeps every member out of the queue, and its
  Permit step holds placed members until ``minCount`` of them are placed, so
  a gang is bound whole or not at all. fleetkeeper creates the PodGroup (and a
  ``Workload`` pointing at the owning Job/StatefulSet) after it sees the
  members, and deletes them after the last member is gone;
* for clusters running the scheduler-plugins scheduler, the Coscheduling
  plugin's ``scheduling.x-k8s.io/v1alpha1`` PodGroup (``spec.minMember``) is
  created instead or as well, and members get the
  ``scheduling.x-k8s.io/pod-group`` label.

:func:`decide_gang` maps one gang's snapshot to a :class:`GangPlan`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fleetkeeper.core.domain import Names
from fleetkeeper.core.resources import COSCHED_PODGROUPS, PODGROUPS, WORKLOADS
from fleetkeeper.core.views import parse_time
from fleetkeeper.core.admission import Admission, AdmissionRequest, json_patch_path

from fleetkeeper.capacity.config import CapacityConfig

COSCHED_LABEL = "scheduling.x-k8s.io/pod-group"
MANAGER = "capacity"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Owner kinds whose replica count fixes the gang size.
OWNER_APIS = {"Job": ("batch", "v1", "jobs"), "StatefulSet": ("apps", "v1", "statefulsets"),
              "ReplicaSet": ("apps", "v1", "replicasets")}


def state_annotation(names: Names) -> str:
    return f"{names.domain}/gang-state"


def message_annotation(names: Names) -> str:
    return f"{names.domain}/gang-message"


@dataclass(frozen=True, slots=True)
class GangPod:
    """The fields of a gang member the controller and explain read."""

    namespace: str
    name: str
    uid: str
    gang: str
    min_members: str  # raw annotation ("" if unset)
    node: str
    phase: str
    deleting: bool
    created: float
    owner_kind: str
    owner_name: str
    owner_uid: str
    owner_api_version: str
    scheduling_group: str  # spec.schedulingGroup.podGroupName
    cosched_group: str  # scheduling.x-k8s.io/pod-group label
    scheduled_message: str  # PodScheduled=False message (not the API server's SchedulingGated)
    gated: bool = False  # carries fleetkeeper's gang gate (Names.gang_gate)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.gang}"

    @property
    def active(self) -> bool:
        return self.phase not in ("Succeeded", "Failed") and not self.deleting


def gang_pod_projector(names: Names):
    gang_label, min_key, gate = names.gang, names.gang_min, names.gang_gate

    def project(obj: dict) -> GangPod:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        labels = meta.get("labels") or {}
        owners = meta.get("ownerReferences") or []
        owner = next((o for o in owners if o.get("controller")), owners[0] if owners else {})
        sched = next((c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"), {})
        return GangPod(
            namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid", ""),
            gang=labels.get(gang_label, ""), min_members=(meta.get("annotations") or {}).get(min_key, ""),
            node=spec.get("nodeName", ""), phase=status.get("phase", "Pending"),
            deleting=bool(meta.get("deletionTimestamp")), created=parse_time(meta.get("creationTimestamp")),
            owner_kind=owner.get("kind", ""), owner_name=owner.get("name", ""), owner_uid=owner.get("uid", ""),
            owner_api_version=owner.get("apiVersion", ""),
            scheduling_group=((spec.get("schedulingGroup") or {}).get("podGroupName") or ""),
            cosched_group=labels.get(COSCHED_LABEL, ""),
            scheduled_message=sched.get("message", "") if sched.get("status") == "False" and
            sched.get("reason") != "SchedulingGated" else "",
            gated=any(g.get("name") == gate for g in spec.get("schedulingGates") or ()),
        )

    return project


@dataclass(frozen=True)
class Owner:
    kind: str
    name: str
    uid: str
    api_version: str
    replicas: int | None  # None: unknown (owner gone, or a kind without a replica count)
    problem: str = ""  # a setting of the owner that stops its gang from ever starting
    gone: bool = False  # the owner no longer exists (or a new object of that name has another uid)
    deleting: bool = False  # the owner has a deletionTimestamp

    @property
    def ending(self) -> bool:
        """The owner is gone or being deleted: its pods are about to go too."""
        return self.gone or self.deleting


def owner_problem(kind: str, obj: dict) -> str:
    spec = obj.get("spec") or {}
    if kind == "StatefulSet" and spec.get("podManagementPolicy", "OrderedReady") != "Parallel":
        return ("StatefulSet uses podManagementPolicy OrderedReady: it creates one pod at a time and waits for it "
                "to be Ready, but a gang member is never placed alone; set podManagementPolicy: Parallel")
    return ""


@dataclass(frozen=True)
class GroupObjects:
    """The group objects that exist for a gang (None: absent)."""

    workload: dict | None = None
    podgroup: dict | None = None
    cosched: dict | None = None

    @property
    def any(self) -> bool:
        return any(o is not None for o in (self.workload, self.podgroup, self.cosched))


@dataclass
class GangPlan:
    key: str
    min_count: int | None = None
    size_source: str = ""  # annotation, Job parallelism, StatefulSet replicas, members seen
    create: list[tuple[object, dict]] = field(default_factory=list)  # (Resource, body)
    delete: list[tuple[object, str]] = field(default_factory=list)  # (Resource, name)
    patch_labels: list[str] = field(default_factory=list)  # pods needing the coscheduling label
    state: str = ""  # Waiting, Running, Broken, Completed, Failed, Deleted
    message: str = ""
    previous_state: str = ""
    problems: list[str] = field(default_factory=list)
    requeue_after: float | None = None
    not_in_group: list[str] = field(default_factory=list)
    held: str = ""  # why fleetkeeper withholds the PodGroup now ("": not held)
    ungate: list[str] = field(default_factory=list)  # members whose gang gate to remove now

    @property
    def state_changed(self) -> bool:
        return bool(self.state) and self.state != self.previous_state and self.state != "Deleted"


def owner_replicas(kind: str, obj: dict) -> int | None:
    spec = obj.get("spec") or {}
    if kind == "Job":
        par = spec.get("parallelism")
        par = 1 if par is None else int(par)
        comp = spec.get("completions")
        return min(par, int(comp)) if comp is not None else par
    if kind in ("StatefulSet", "ReplicaSet"):
        r = spec.get("replicas")
        return 1 if r is None else int(r)
    return None


def parse_min(raw: str) -> int | None:
    try:
        v = int(raw)
    except (TypeError, ValueError):
        return None
    return v if v >= 1 else None


def resolve_min(pods: list[GangPod], owner: Owner | None, now: float, settle: float) -> tuple[int | None, str, float | None, list[str]]:
    """(minCount, where it came from, requeue_after, problems)."""
    problems: list[str] = []
    values = sorted({p.min_members for p in pods if p.min_members})
    parsed = [parse_min(v) for v in values]
    for raw, v in zip(values, parsed):
        if v is None:
            problems.append(f"annotation gang-min-members={raw!r} is not a positive integer; ignored")
    good = sorted({v for v in parsed if v is not None})
    if len(good) > 1:
        problems.append(f"members disagree on gang-min-members ({good}); using the largest")
    if good:
        return good[-1], "annotation", None, problems
    if owner is not None and owner.replicas is not None:
        what = {"Job": "Job parallelism", "StatefulSet": "StatefulSet replicas",
                "ReplicaSet": "ReplicaSet replicas"}.get(owner.kind, f"{owner.kind} replicas")
        return owner.replicas, what, None, problems
    newest = max((p.created for p in pods), default=now)
    wait = newest + settle - now
    if wait > 0:
        return None, "", wait, problems
    return len(pods), "members seen", None, problems


def workload_body(ns: str, gang: str, min_count: int, owner: Owner | None, names: Names) -> dict:
    spec: dict = {"podGroupTemplates": [{"name": "workers", "schedulingPolicy": {"gang": {"minCount": min_count}}}]}
    if owner is not None and owner.kind:
        group = owner.api_version.split("/")[0] if "/" in owner.api_version else ""
        spec["controllerRef"] = {"apiGroup": group, "kind": owner.kind, "name": owner.name} if group else \
            {"kind": owner.kind, "name": owner.name}
    return {"apiVersion": WORKLOADS.api_version, "kind": "Workload",
            "metadata": _meta(ns, gang, owner, names), "spec": spec}


def podgroup_body(ns: str, gang: str, min_count: int, owner: Owner | None, names: Names) -> dict:
    return {"apiVersion": PODGROUPS.api_version, "kind": "PodGroup", "metadata": _meta(ns, gang, owner, names),
            "spec": {"podGroupTemplateRef": {"workload": {"workloadName": gang, "podGroupTemplateName": "workers"}},
                     "schedulingPolicy": {"gang": {"minCount": min_count}}}}


def cosched_body(ns: str, gang: str, min_count: int, owner: Owner | None, names: Names, timeout: int) -> dict:
    return {"apiVersion": COSCHED_PODGROUPS.api_version, "kind": "PodGroup", "metadata": _meta(ns, gang, owner, names),
            "spec": {"minMember": min_count, "scheduleTimeoutSeconds": timeout}}


def _meta(ns: str, gang: str, owner: Owner | None, names: Names) -> dict:
    meta: dict = {"name": gang, "namespace": ns, "labels": {names.managed_by: MANAGER, names.gang: gang}}
    if owner is not None and owner.uid:
        # the garbage collector removes the group with its Job/StatefulSet even if fleetkeeper is down
        meta["ownerReferences"] = [{"apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                                    "uid": owner.uid, "controller": False, "blockOwnerDeletion": False}]
    return meta


def group_min(obj: dict | None) -> int | None:
    """The minimum members a group object asks for (any of the three kinds)."""
    if obj is None:
        return None
    spec = obj.get("spec") or {}
    if "minMember" in spec:
        return int(spec["minMember"])
    policy = spec.get("schedulingPolicy")
    if policy is None and spec.get("podGroupTemplates"):
        policy = spec["podGroupTemplates"][0].get("schedulingPolicy")
    gang = (policy or {}).get("gang") or {}
    return int(gang["minCount"]) if "minCount" in gang else None


def group_condition(obj: dict | None, type_: str = "PodGroupScheduled") -> dict | None:
    if obj is None:
        return None
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == type_:
            return c
    return None


def _state_of(objs: GroupObjects, names: Names) -> str:
    for o in (objs.podgroup, objs.cosched, objs.workload):
        state = (((o or {}).get("metadata") or {}).get("annotations") or {}).get(state_annotation(names), "")
        if state:
            return state
    return ""


def gang_state(pods: list[GangPod], min_count: int, node_ok: dict[str, bool], group: dict | None) -> tuple[str, str]:
    """(state, human message) of a gang from its members and the nodes under them.

    A gang is Running from the moment ``min_count`` members were placed until
    every member has finished: members that already succeeded count as placed,
    so a gang whose members finish at different times does not fall back to
    Waiting while the last ones run."""
    active = [p for p in pods if p.active]
    succeeded = [p for p in pods if p.phase == "Succeeded"]
    failed = [p for p in pods if p.phase == "Failed"]
    bound = [p for p in active if p.node]
    lost = sorted((p for p in bound if not node_ok.get(p.node, False)), key=lambda p: p.name)
    if lost:
        what = ", ".join(f"{p.name} on {p.node} ({'NotReady' if p.node in node_ok else 'node gone'})" for p in lost[:5])
        return "Broken", (f"member(s) lost: {what}; the job cannot continue partially and must restart whole "
                          f"from its last checkpoint ({len(bound) - len(lost)}/{min_count} members still placed)")
    if failed and bound:
        names_ = ", ".join(p.name for p in failed[:5])
        return "Broken", (f"member(s) failed: {names_} while {len(bound)} others run; the job must restart whole "
                          f"from its last checkpoint")
    if not active:
        if len(succeeded) >= min_count:
            return "Completed", f"{len(succeeded)} members succeeded"
        if failed:
            return "Failed", f"{len(failed)} members failed, {len(succeeded)} succeeded"
    if bound and len(bound) + len(succeeded) >= min_count:
        running = sum(1 for p in bound if p.phase == "Running")
        return "Running", (f"{len(bound) + len(succeeded)}/{min_count} members placed, {running} running"
                           + (f", {len(succeeded)} succeeded" if succeeded else ""))
    if len(active) < min_count:
        return "Waiting", (f"{len(active)} of {min_count} members exist; the scheduler holds all of them until "
                           f"{min_count} exist")
    cond = group_condition(group)
    why = ""
    if cond is not None and cond.get("status") == "False":
        why = cond.get("message") or cond.get("reason") or ""
    if not why:
        why = next((p.scheduled_message for p in active if p.scheduled_message), "")
    return "Waiting", (f"{len(bound)}/{min_count} members placed; waiting whole for room for all {min_count}"
                       + (f" (scheduler: {why})" if why else ""))


# What the balloon pass's simulation says about a waiting gang (BalloonManager, capacity/yielding.py)
ROOM_FITS, ROOM_BLOCKED, ROOM_UNFIT = "fits", "blocked", "unfit"


JUDGE_MARGIN = 2.0  # a pass this long after a gang's last member appeared would have judged it (whole seconds)


def hold_podgroup(pods: list[GangPod], min_count: int, objs: GroupObjects, cfg: CapacityConfig, room: str | None,
                  now: float, judged_at: float | None = None) -> tuple[str, float | None]:
    """Whether to withhold a large gang's PodGroup now: (why, look again in s); ("", None): create it.

    kube-scheduler runs pod group cycles on its one scheduling thread. A cycle
    of a group that does not fit filters every member against every node and,
    for each member that finds no node, runs DefaultPreemption's dry run over
    every node again, so it costs members x nodes; the failed group goes back
    to the backoff queue, and while the active queue is empty the scheduler
    pops it from there at once (SchedulerPopFromBackoffQ, on by default), so
    it retries such a group back to back. A 1,000-member gang on 1,000 nodes
    thus holds the thread for seconds per cycle, and every smaller gang that
    becomes ready meanwhile waits for the cycle to end. Without its PodGroup,
    GangScheduling's PreEnqueue keeps the members out of the queue at no cost;
    fleetkeeper creates it when its simulation places the gang whole (``room``
    is ROOM_FITS), or the gang is no pool's work (ROOM_UNFIT), or no pool has
    judged it ``hold_unjudged_seconds`` after its last member appeared, or a
    pass that ran after that (``judged_at``) left it out (no pool's work). A
    reservation (capacity/reserve.py) still applies to a held gang: it is
    waiting work like any other."""
    limit = cfg.gangs.hold_until_room_members
    if limit is None or not cfg.in_tree or min_count < limit or objs.podgroup is not None:
        return "", None
    if any(p.node or p.phase in ("Running", "Succeeded", "Failed") for p in pods):
        return "", None  # members were placed: the gang is the scheduler's already
    active = [p for p in pods if p.active]
    if len(active) < min_count:
        return (f"fleetkeeper creates its PodGroup once all {min_count} members exist and fit the pool "
                f"together"), None
    if room in (ROOM_FITS, ROOM_UNFIT):
        return "", None
    if room is None:
        since = max(p.created for p in active)
        # a pass counts a gang whose members have not all been tried only once its group object is there (the
        # pass's ``complete``: the shared informer has it): a pass before that left it out for want of it, not
        # because no pool takes it. At start-up the gang controller creates hundreds of Workloads behind a
        # burst, and small gangs were let go onto room the pass kept for an older, larger gang
        made = parse_time(((objs.workload or {}).get("metadata") or {}).get("creationTimestamp"))
        if judged_at is not None and objs.workload is not None and judged_at >= max(since, made) + JUDGE_MARGIN:
            return "", None  # a pass ran since it was complete and no pool took it: kube-scheduler's call
        wait = since + cfg.gangs.hold_unjudged_seconds - now
        if wait <= 0:
            return "", None
        return "fleetkeeper holds its PodGroup until its pool's simulation has looked at it", wait
    return (f"fleetkeeper holds its PodGroup until room for all {min_count} members is free at once (a large "
            f"gang's failed pod group cycles would take kube-scheduler's scheduling thread from smaller work)"), None


def decide_gang(key: str, pods: list[GangPod], owner: Owner | None, objs: GroupObjects, node_ok: dict[str, bool],
                cfg: CapacityConfig, names: Names, now: float, empty_since: float | None,
                room: str | None = ROOM_FITS, judged_at: float | None = None) -> GangPlan:
    """``room``: the balloon pass's verdict on this gang (ROOM_FITS, ROOM_BLOCKED, ROOM_UNFIT; None: not
    judged); ``judged_at``: when the last pass ran; only gangs held until room read them
    (:func:`hold_podgroup`)."""
    ns, gang = key.split("/", 1)
    plan = GangPlan(key, previous_state=_state_of(objs, names))
    if owner is not None and owner.problem and pods:
        plan.problems.append(owner.problem)
    if not pods:
        if not objs.any:
            return plan
        since = empty_since if empty_since is not None else now
        wait = since + cfg.gangs.cleanup_grace_seconds - now
        if wait > 0:
            plan.requeue_after = wait
            return plan
        for res, o in ((COSCHED_PODGROUPS, objs.cosched), (PODGROUPS, objs.podgroup), (WORKLOADS, objs.workload)):
            if o is not None and (o.get("metadata") or {}).get("labels", {}).get(names.managed_by) == MANAGER:
                plan.delete.append((res, gang))
        plan.state = "Deleted"
        return plan
    if all(p.deleting for p in pods):
        return plan  # the gang is going away (e.g. its namespace): create nothing; clean up once the pods are gone
    if owner is not None and owner.ending:
        # the Job/StatefulSet is gone or being deleted and its pods follow: never build a group from the pods
        # that are left (it would have the wrong size and an owner that no longer exists); clean up once they are gone
        plan.message = f"owner {owner.kind} {owner.name} is {'being deleted' if owner.deleting else 'gone'}"
        return plan
    if not _DNS_LABEL.match(gang) or len(gang) > 63:
        plan.problems.append(f"gang name {gang!r} is not a DNS label; PodGroups cannot be named after it")
        return plan
    min_count, source, wait, problems = resolve_min(pods, owner, now, cfg.gangs.bare_pod_settle_seconds)
    plan.problems.extend(problems)
    if min_count is None:
        plan.requeue_after = wait
        plan.state, plan.message = "Waiting", "gathering members before fixing the gang size"
        return plan
    plan.min_count, plan.size_source = min_count, source
    scheduled = any(p.node for p in pods if p.active)
    plan.held, hold_wait = hold_podgroup(pods, min_count, objs, cfg, room, now, judged_at)
    if not plan.held:
        # the gate goes first and the PodGroup follows once no member carries it: kube-scheduler's pod group
        # cycle takes only the members in its queue, so a PodGroup seen while some were gated would run a
        # cycle short of members
        plan.ungate = sorted(p.name for p in pods if p.gated and not p.node and not p.deleting)
    wanted: list[tuple[object, dict | None, dict]] = []
    if cfg.in_tree:
        wanted.append((WORKLOADS, objs.workload, workload_body(ns, gang, min_count, owner, names)))
        if not plan.held and not (plan.ungate and objs.podgroup is None):
            wanted.append((PODGROUPS, objs.podgroup, podgroup_body(ns, gang, min_count, owner, names)))
    if cfg.coscheduling:
        wanted.append((COSCHED_PODGROUPS, objs.cosched,
                       cosched_body(ns, gang, min_count, owner, names, cfg.gangs.schedule_timeout_seconds)))
    for res, have, body in wanted:
        if have is None:
            plan.create.append((res, body))
            continue
        have_min = group_min(have)
        if have_min is not None and have_min != min_count:
            if scheduled:
                plan.problems.append(f"{res.kind} {gang} has minCount {have_min} but the gang now needs {min_count} "
                                     f"({source}); left as is while members are placed (the spec is immutable)")
            else:
                plan.delete.append((res, gang))  # recreated with the new size on the next pass
                plan.requeue_after = 1.0
    if cfg.in_tree:
        plan.not_in_group = sorted(p.name for p in pods if p.active and not p.node and p.scheduling_group != gang)
    if cfg.coscheduling:
        plan.patch_labels = sorted(p.name for p in pods if p.active and not p.node and p.cosched_group != gang)
    plan.state, plan.message = gang_state(pods, min_count, node_ok, objs.podgroup or objs.cosched)
    if plan.ungate:
        plan.requeue_after = 1.0 if plan.requeue_after is None else min(plan.requeue_after, 1.0)
    if plan.held:
        plan.message += f"; {plan.held}"
        if hold_wait is not None:
            plan.requeue_after = hold_wait if plan.requeue_after is None else min(plan.requeue_after, hold_wait)
    if plan.not_in_group:
        plan.message += (f"; {len(plan.not_in_group)} member(s) were created without spec.schedulingGroup "
                         f"(webhook not active then) and are scheduled one by one: recreate them")
    return plan


# --- admission --------------------------------------------------------------

def gates_members(cfg: CapacityConfig) -> bool:
    """Whether gang members are admitted with fleetkeeper's scheduling gate (see ``gate_held_members``)."""
    return cfg.in_tree and cfg.gangs.hold_until_room_members is not None and cfg.gangs.gate_held_members


def mutate_pod(req: AdmissionRequest, cfg: CapacityConfig, names: Names, gate: bool = True) -> Admission:
    """Pod CREATE: put a gang member into its group (pure; served by the webhook). With ``gate`` (not in
    dry-run) and the hold on, the member also gets fleetkeeper's scheduling gate: kube-scheduler then skips it
    when a sibling arrives, and the gang controller removes it when the gang is no longer held."""
    if req.kind != "Pod" or req.operation != "CREATE":
        return Admission()
    meta = req.obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    gang = labels.get(names.gang)
    if gang is None:
        return Admission()
    if not _DNS_LABEL.match(gang):
        return Admission(False, f"label {names.gang}={gang!r}: a gang name must be a DNS label (lower-case letters, "
                                f"digits and '-', starting and ending with a letter or digit): it names the "
                                f"gang's PodGroup", code=400)
    raw_min = (meta.get("annotations") or {}).get(names.gang_min)
    if raw_min is not None and parse_min(raw_min) is None:
        return Admission(False, f"annotation {names.gang_min}={raw_min!r}: must be a positive integer "
                                f"(the minimum members placed together)", code=400)
    spec = req.obj.get("spec") or {}
    patch: list[dict] = []
    warnings: list[str] = []
    if cfg.in_tree:
        current = (spec.get("schedulingGroup") or {}).get("podGroupName")
        if current is None:
            patch.append({"op": "add", "path": "/spec/schedulingGroup", "value": {"podGroupName": gang}})
        elif current != gang:
            warnings.append(f"pod names schedulingGroup {current!r} but carries {names.gang}={gang}; left as set")
        gates = spec.get("schedulingGates")
        if gate and gates_members(cfg) and current in (None, gang) and not spec.get("nodeName") and \
                not any(isinstance(g, dict) and g.get("name") == names.gang_gate for g in gates or ()):
            if isinstance(gates, list):
                patch.append({"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": names.gang_gate}})
            else:
                patch.append({"op": "add", "path": "/spec/schedulingGates", "value": [{"name": names.gang_gate}]})
    if cfg.coscheduling:
        if labels.get(COSCHED_LABEL) != gang:
            patch.append({"op": "add", "path": json_patch_path("metadata", "labels", COSCHED_LABEL), "value": gang})
        sched = cfg.gangs.coscheduling_scheduler_name
        if sched and spec.get("schedulerName") in (None, "", "default-scheduler"):
            patch.append({"op": "add", "path": "/spec/schedulerName", "value": sched})
    return Admission(True, patch=patch, warnings=warnings)
