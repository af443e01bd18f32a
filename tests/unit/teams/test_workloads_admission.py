"""Workload kinds, template paths, bypasses and attribution through controllers."""

from __future__ import annotations

import copy

import orjson
import pytest

from fleetkeeper.core.attribution import OwnerEntry, Stamp, resolve
from fleetkeeper.core.webhook import AdmissionRequest
from fleetkeeper.teams.admission import TeamAdmission, apply_ops
from fleetkeeper.teams.config import ConfigState, TeamsConfig
from fleetkeeper.teams.workloads import DEFAULT_WORKLOADS, WorkloadKinds, find, templates

from teams_helpers import N
from test_admission import A_TOL, ANY_TOL, B_TOL, CFG, PRIO

KINDS = WorkloadKinds(DEFAULT_WORKLOADS)
JOBSET_SA = "system:serviceaccount:jobset-system:jobset-controller-manager"
SA_GROUPS = ("system:serviceaccounts", "system:serviceaccounts:jobset-system", "system:authenticated")
PREFLIGHT_TOL = {"key": N.preflight, "operator": "Exists", "effect": "NoSchedule"}
QUARANTINE_TOL = {"key": N.quarantine, "operator": "Exists"}


def tmpl(tols=None, pcn=None) -> dict:
    spec: dict = {"containers": [{"name": "c", "image": "x"}]}
    if tols is not None:
        spec["tolerations"] = copy.deepcopy(tols)
    if pcn:
        spec["priorityClassName"] = pcn
    return {"metadata": {}, "spec": spec}


def jobset(tols=None, pcn=None, jobs=2) -> dict:
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "js", "namespace": "ns"},
            "spec": {"replicatedJobs": [{"name": f"rj{i}", "replicas": 2, "template": {"spec": {
                "parallelism": 4, "template": tmpl(tols, pcn)}}} for i in range(jobs)]}}


def mpijob(tols=None) -> dict:
    return {"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"mpiReplicaSpecs": {"Launcher": {"replicas": 1, "template": tmpl(tols)},
                                         "Worker": {"replicas": 4, "template": tmpl(tols)}}}}


def rc(tols=None, pcn=None) -> dict:
    return {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "rc", "namespace": "ns"},
            "spec": {"replicas": 1, "template": tmpl(tols, pcn)}}


def deployment(tols=None, pcn=None) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"template": tmpl(tols, pcn)}}


def cronjob(tols=None) -> dict:
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cj", "namespace": "ns"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": tmpl(tols)}}}}


def pod(tols=None, owner=None) -> dict:
    meta: dict = {"name": "p", "namespace": "ns"}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": owner,
                                    "controller": True}]
    spec: dict = {"containers": [{"name": "c", "image": "x"}]}
    if tols is not None:
        spec["tolerations"] = tols
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


class Owners(dict):
    def __call__(self, uid):
        return self.get(uid)


def handlers(owners=None, cfg=CFG) -> TeamAdmission:
    st = ConfigState()
    st.accept(cfg, "1")
    return TeamAdmission(N, st, lambda: PRIO, kinds=KINDS, owners=owners or Owners())


def request(obj, user="alice", groups=("team-a",), op="CREATE", old=None) -> AdmissionRequest:
    api = obj["apiVersion"]
    return AdmissionRequest("u", obj["kind"], op, "ns", obj["metadata"]["name"], user, tuple(groups), obj, old,
                            False, api.rpartition("/")[0] if "/" in api else "")


def admit(h, r):
    m = h.mutate(r)
    if not m.allowed:
        return m, m, r.obj
    after = apply_ops(r.obj, m.patch)
    v = h.validate(AdmissionRequest(r.uid, r.kind, r.operation, r.namespace, r.name, r.username, r.groups, after,
                                    r.old, False, r.group))
    return m, v, after


# --- template paths ---------------------------------------------------------------------------------

def test_template_paths_of_the_shipped_kinds():
    assert [p for p, _ in templates(KINDS.get("jobset.x-k8s.io", "JobSet"), jobset())] == [
        ("spec", "replicatedJobs", 0, "template", "spec", "template"),
        ("spec", "replicatedJobs", 1, "template", "spec", "template")]
    assert [p for p, _ in templates(KINDS.get("kubeflow.org", "MPIJob"), mpijob())] == [
        ("spec", "mpiReplicaSpecs", "Launcher", "template"), ("spec", "mpiReplicaSpecs", "Worker", "template")]
    lws = {"spec": {"leaderWorkerTemplate": {"leaderTemplate": tmpl(), "workerTemplate": tmpl(), "size": 4}}}
    assert len(templates(KINDS.get("leaderworkerset.x-k8s.io", "LeaderWorkerSet"), lws)) == 2
    ray = {"spec": {"rayClusterSpec": {"headGroupSpec": {"template": tmpl()},
                                       "workerGroupSpecs": [{"template": tmpl()}, {"template": tmpl()}]}}}
    assert len(templates(KINDS.get("ray.io", "RayJob"), ray)) == 3
    pt = {"spec": {"pytorchReplicaSpecs": {"Master": {"template": tmpl()}, "Worker": {"template": tmpl()}}}}
    assert len(templates(KINDS.get("kubeflow.org", "PyTorchJob"), pt)) == 2
    assert find({"a": [1, {"b": {}}]}, "a[*].b") == [(("a", 1, "b"), {})]
    assert KINDS.get("", "ReplicationController") is not None and KINDS.get("batch", "CronJob") is not None


def test_every_template_gets_the_team_toleration_and_the_stamp():
    m, v, after = admit(handlers(), request(jobset()))
    assert v.allowed
    for rj in after["spec"]["replicatedJobs"]:
        assert rj["template"]["spec"]["template"]["spec"]["tolerations"] == [A_TOL]
        assert rj["template"]["spec"]["template"]["metadata"]["labels"] == {N.team: "team-a"}
    assert Stamp.decode(after["metadata"]["annotations"][N.requester]) == Stamp("alice", ("team-a",))


# --- bypass rows (docs/teams.md) ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [jobset, mpijob, rc, deployment, cronjob])
def test_foreign_team_toleration_in_any_template_of_any_kind_is_refused(make):
    m, v, _ = admit(handlers(), request(make([B_TOL]), user="alice"))
    assert not v.allowed and "team 'team-b'" in v.message and "alice" in v.message and "teams: team-a" in v.message


@pytest.mark.parametrize("make", [rc, jobset, mpijob, cronjob])
def test_blanket_exists_in_a_template_is_refused(make):
    m, v, _ = admit(handlers(), request(make([{"operator": "Exists"}]), user="bob", groups=("team-b",)))
    assert not v.allowed and "every team" in v.message and "{<any key> Exists" in v.message
    assert "teams: team-b" in v.message


def test_priority_flip_rejudges_every_toleration():
    h = handlers()
    _, v, low = admit(h, request(deployment(pcn="low")))
    assert v.allowed and low["spec"]["template"]["spec"]["tolerations"] == [ANY_TOL]
    flipped = copy.deepcopy(low)
    flipped["spec"]["template"]["spec"]["priorityClassName"] = "normal"
    m, v, _ = admit(h, request(flipped, op="UPDATE", old=low))
    assert not v.allowed and "every team" in v.message and "after this update is 0" in v.message
    # the same flip with the borrowed toleration removed: the webhook gives the team's instead
    flipped["spec"]["template"]["spec"]["tolerations"] = []
    m, v, after = admit(h, request(flipped, op="UPDATE", old=low))
    assert v.allowed and after["spec"]["template"]["spec"]["tolerations"] == [A_TOL]
    # an update that does not touch the priority keeps the old rule (only added tolerations are judged)
    same = copy.deepcopy(low)
    same["spec"]["template"]["metadata"]["labels"]["x"] = "y"
    assert admit(h, request(same, op="UPDATE", old=low))[1].allowed


def test_a_low_priority_template_still_cannot_name_a_foreign_team_after_a_flip():
    h = handlers()
    _, v, low = admit(h, request(deployment(pcn="low", tols=[B_TOL])))
    assert v.allowed  # borrowers may tolerate any team
    flipped = copy.deepcopy(low)
    flipped["spec"]["template"]["spec"]["priorityClassName"] = "high"
    _, v, _ = admit(h, request(flipped, op="UPDATE", old=low))
    assert not v.allowed and "team 'team-b'" in v.message


@pytest.mark.parametrize("tol", [PREFLIGHT_TOL, QUARANTINE_TOL, {"key": f"{N.domain}/draining", "operator": "Exists"}])
@pytest.mark.parametrize("pcn", [None, "low"])
def test_lifecycle_taint_tolerations_are_only_for_exempt_requesters(tol, pcn):
    h = handlers()
    for make in (deployment, rc):
        _, v, _ = admit(h, request(make([tol], pcn=pcn)))
        assert not v.allowed and "lifecycle" in v.message and "teams: team-a" in v.message
    _, v, _ = admit(h, request(pod([tol])))
    assert not v.allowed
    _, v, _ = admit(h, request(pod([tol]), user="admin", groups=("system:masters",)))
    assert v.allowed


def test_blanket_exists_is_a_lifecycle_toleration_even_for_borrowers():
    _, v, _ = admit(handlers(), request(deployment([{"operator": "Exists"}], pcn="low")))
    assert not v.allowed and "lifecycle" in v.message


def test_cronjob_template_edit_adding_a_foreign_team_is_refused():
    h = handlers()
    _, v, cj = admit(h, request(cronjob(), user="bob", groups=("team-b",)))
    assert v.allowed
    edited = copy.deepcopy(cj)
    edited["spec"]["jobTemplate"]["spec"]["template"]["spec"]["tolerations"].append(A_TOL)
    _, v, _ = admit(h, request(edited, user="bob", groups=("team-b",), op="UPDATE", old=cj))
    assert not v.allowed and "team 'team-a'" in v.message and "teams: team-b" in v.message


# --- the stamp --------------------------------------------------------------------------------------

def test_the_stamp_cannot_be_forged():
    forged = jobset()
    forged["metadata"]["annotations"] = {N.requester: Stamp("alice", ("team-a",)).encode()}
    m, v, after = admit(handlers(), request(forged, user="bob", groups=("team-b",)))
    assert v.allowed and Stamp.decode(after["metadata"]["annotations"][N.requester]) == Stamp("bob", ("team-b",))
    # with the mutating webhook down (failurePolicy Ignore) the validating one refuses the forgery
    v = handlers().validate(request(forged, user="bob", groups=("team-b",)))
    assert not v.allowed and N.requester in v.message
    # an update cannot change it either
    _, _, mine = admit(handlers(), request(jobset(), user="bob", groups=("team-b",)))
    changed = copy.deepcopy(mine)
    changed["metadata"]["annotations"][N.requester] = Stamp("bob", ("team-a",)).encode()
    m, v, after = admit(handlers(), request(changed, user="bob", groups=("team-b",), op="UPDATE", old=mine))
    assert after["metadata"]["annotations"][N.requester] == mine["metadata"]["annotations"][N.requester]
    assert not handlers().validate(request(changed, user="bob", groups=("team-b",), op="UPDATE", old=mine)).allowed


# --- attribution through controllers ----------------------------------------------------------------

def chain(stamp: Stamp | None) -> Owners:
    return Owners({
        "job-1": OwnerEntry("job-1", "Job", "ns", "js-rj0-0", None, "js-1"),
        "js-1": OwnerEntry("js-1", "JobSet", "ns", "js", stamp, ""),
    })


def test_a_controllers_pod_is_judged_as_the_workloads_requester():
    h = handlers(chain(Stamp("alice", ("team-a",))))
    m, v, after = admit(h, request(pod(owner="job-1"), user=JOBSET_SA, groups=SA_GROUPS))
    assert v.allowed and after["spec"]["tolerations"] == [A_TOL]
    assert Stamp.decode(after["metadata"]["annotations"][N.requester]) == Stamp("alice", ("team-a",))
    m, v, _ = admit(h, request(pod([B_TOL], owner="job-1"), user=JOBSET_SA, groups=SA_GROUPS))
    assert not v.allowed and "team 'team-b'" in v.message and "through" in v.message and "JobSet ns/js" in v.message


def test_a_controllers_pod_without_a_known_owner_gets_no_team():
    for owners in (Owners(), chain(None)):
        h = handlers(owners)
        m, v, after = admit(h, request(pod([A_TOL], owner="job-1"), user=JOBSET_SA, groups=SA_GROUPS))
        assert not v.allowed and "team tolerations cannot be granted" in v.message


def test_a_user_cannot_borrow_a_stamp_through_a_forged_owner_reference():
    h = handlers(chain(Stamp("alice", ("team-a",))))
    m, v, _ = admit(h, request(pod([A_TOL], owner="job-1"), user="bob", groups=("team-b",)))
    assert not v.allowed and "team 'team-a'" in v.message


def test_an_operator_that_is_not_a_configured_controller_is_judged_as_itself():
    cfg = TeamsConfig.model_validate({**CFG.model_dump(by_alias=True), "controllers": {"users": []}})
    h = handlers(chain(Stamp("alice", ("team-a",))), cfg=cfg)
    m, v, _ = admit(h, request(pod([A_TOL], owner="job-1"), user=JOBSET_SA, groups=SA_GROUPS))
    assert not v.allowed and "member of no team" in v.message


def test_resolve_follows_the_chain_and_stops_at_unknown_owners():
    stamp = Stamp("alice", ("team-a",))
    s, walked = resolve("job-1", chain(stamp))
    assert s == stamp and [e.kind for e in walked] == ["Job", "JobSet"]
    assert resolve("nope", chain(stamp)) == (None, [])
    assert Stamp.decode("not json") is None and Stamp.decode(orjson.dumps({"user": 3}).decode()) is None


def test_an_exempt_controllers_pod_waits_for_its_owner_and_inherits_its_stamp():
    """The Job controller (exempt) creates a pod a moment after its Job (a JobSet's or an MPIJob's
    launcher): the webhook waits for the owner like for a configured controller's pod, so the pod
    is stamped with the workload's requester, not with the controller's own identity."""
    h = handlers()
    owners = h.owners
    r = request(pod(owner="job-1"), user="admin", groups=("system:masters",))
    assert h.needs_owner(r) == r.obj["metadata"]["ownerReferences"][0]  # not cached yet: wait for it
    owners.update(chain(Stamp("alice", ("team-a",))))
    assert h.needs_owner(r) is None  # cached: no wait
    _, v, after = admit(h, r)
    assert v.allowed and Stamp.decode(after["metadata"]["annotations"][N.requester]) == Stamp("alice", ("team-a",))
    assert h.needs_owner(request(pod(owner=None), user="admin", groups=("system:masters",))) is None
    assert h.needs_owner(request(pod(owner="job-1"), user="bob", groups=("team-b",))) is None  # neither
