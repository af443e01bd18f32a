"""The toleration webhook's pure handlers."""

from __future__ import annotations

import base64

import orjson
import pytest

from fleetkeeper.core.webhook import AdmissionRequest
from fleetkeeper.teams.admission import (ANY, DEFAULT_KINDS, Priorities, TeamAdmission, apply_ops, borrower_label,
                                         coverage, judge, patch_for)
from fleetkeeper.teams.config import ConfigState, TeamsConfig

from teams_helpers import N

CFG = TeamsConfig.model_validate({
    "teams": [{"team": "team-a", "nodeSelector": {}, "count": 1}, {"team": "team-b", "nodeSelector": {}, "count": 1}],
    "membership": {"team-a": {"groups": ["team-a"]}, "team-b": {"groups": ["team-b"], "users": ["dave"]},
                   "team-c": {"groups": ["team-c", "team-a-and-c"]}},
    "lowPriority": {"below": 0},
})
PRIO = Priorities({"low": -10, "normal": 0, "high": 1000}, 0)
A_TOL = {"key": N.team, "operator": "Equal", "value": "team-a", "effect": "NoSchedule"}
B_TOL = {"key": N.team, "operator": "Equal", "value": "team-b", "effect": "NoSchedule"}
ANY_TOL = {"key": N.team, "operator": "Exists", "effect": "NoSchedule"}


def pod(tolerations=None, priority=None, labels=None, pcn=None) -> dict:
    spec: dict = {"containers": [{"name": "c", "image": "x"}]}
    if tolerations is not None:
        spec["tolerations"] = tolerations
    if priority is not None:
        spec["priority"] = priority
    if pcn:
        spec["priorityClassName"] = pcn
    meta: dict = {"name": "p", "namespace": "ns"}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


GROUPS = {k.kind: k.group for k in DEFAULT_KINDS.kinds}


def req(obj, user="alice", groups=("team-a", "researchers"), kind="Pod", op="CREATE", old=None) -> AdmissionRequest:
    return AdmissionRequest("uid-1", kind, op, "ns", "p", user, tuple(groups), obj, old, False, GROUPS[kind])


def handlers(cfg=CFG) -> TeamAdmission:
    st = ConfigState()
    if cfg is not None:
        st.accept(cfg, "1")
    return TeamAdmission(N, st, lambda: PRIO)


def apply_patch(obj: dict, ops: list[dict]) -> dict:
    return apply_ops(obj, ops)


def admit(h: TeamAdmission, r: AdmissionRequest):
    """What the API server does: mutate, apply the patch, then validate the result."""
    m = h.mutate(r)
    if not m.allowed:
        return m, m
    after = apply_ops(r.obj, m.patch)
    return m, h.validate(AdmissionRequest(r.uid, r.kind, r.operation, r.namespace, r.name, r.username, r.groups,
                                          after, r.old, False, r.group))


@pytest.mark.parametrize("tol,expected", [
    (A_TOL, "team-a"),
    (ANY_TOL, ANY),
    ({"operator": "Exists"}, ANY),
    ({"key": N.team, "operator": "Equal", "value": "team-b"}, "team-b"),  # no effect: matches NoSchedule
    ({"key": N.team, "operator": "Equal", "value": "team-b", "effect": "NoExecute"}, None),
    ({"key": "other", "operator": "Exists"}, None),
    ({"operator": "Exists", "effect": "NoExecute"}, None),
])
def test_coverage(tol, expected):
    assert coverage(tol, N.team) == expected


def test_team_member_gets_team_toleration_and_label():
    r = handlers().mutate(req(pod()))
    assert r.allowed
    out = apply_patch(pod(), r.patch)
    assert out["spec"]["tolerations"] == [A_TOL]
    assert out["metadata"]["labels"] == {N.team: "team-a"}


def test_mutation_is_idempotent_under_reinvocation():
    h = handlers()
    first = apply_patch(pod(labels={}), h.mutate(req(pod(labels={}))).patch)
    again = h.mutate(req(first))
    assert again.allowed and again.patch == []


def test_low_priority_gets_any_instead_of_team():
    r = handlers().mutate(req(pod(priority=-10)))
    out = apply_patch(pod(priority=-10), r.patch)
    assert out["spec"]["tolerations"] == [ANY_TOL]
    assert out["metadata"]["labels"] == {borrower_label(N): "team-a"}
    assert N.team not in out["metadata"]["labels"]


def test_team_comes_from_the_request_not_the_pod():
    # bob (team-b) writing alice's team label is rejected; his pod gets team-b
    h = handlers()
    r = h.mutate(req(pod(labels={N.team: "team-a"}), user="bob", groups=("team-b",)))
    assert not r.allowed and "not in team 'team-a'" in r.message
    r = h.mutate(req(pod(), user="bob", groups=("team-b",)))
    assert apply_patch(pod(), r.patch)["spec"]["tolerations"] == [B_TOL]


def test_user_membership_by_name():
    r = handlers().mutate(req(pod(), user="dave", groups=("researchers",)))
    assert apply_patch(pod(), r.patch)["spec"]["tolerations"] == [B_TOL]


def test_member_of_two_teams_gets_both_or_the_chosen_one():
    h = handlers()
    both = apply_patch(pod(), h.mutate(req(pod(), groups=("team-a", "team-a-and-c"))).patch)
    assert {t["value"] for t in both["spec"]["tolerations"]} == {"team-a", "team-c"}
    assert "labels" not in both["metadata"]
    chosen = pod(labels={N.team: "team-c"})
    out = apply_patch(chosen, h.mutate(req(chosen, groups=("team-a", "team-a-and-c"))).patch)
    assert [t["value"] for t in out["spec"]["tolerations"]] == ["team-c"]


def test_no_team_no_toleration():
    r = handlers().mutate(req(pod(), user="mallory", groups=("researchers",)))
    assert r.allowed and [op["path"] for op in r.patch] == ["/metadata/annotations"]  # only the stamp


@pytest.mark.parametrize("user,groups,tols,prio,ok,msg", [
    ("alice", ("team-a",), [B_TOL], 0, False, "team 'team-b'"),
    ("alice", ("team-a",), [ANY_TOL], 0, False, "every team"),
    ("alice", ("team-a",), [{"operator": "Exists"}], 0, False, "every team"),
    ("mallory", ("researchers",), [A_TOL], 0, False, "member of no team"),
    ("alice", ("team-a",), [A_TOL], 0, True, ""),
    ("alice", ("team-a",), [ANY_TOL], -10, True, ""),
    ("alice", ("team-a",), [{"key": "gpu", "operator": "Exists"}], 0, True, ""),
    ("admin", ("system:masters",), [ANY_TOL], 0, True, ""),  # exempt
])
def test_validate(user, groups, tols, prio, ok, msg):
    m, r = admit(handlers(), req(pod(tolerations=tols, priority=prio), user=user, groups=groups))
    assert r.allowed is ok
    assert handlers().validate(req(pod(tolerations=tols, priority=prio), user=user, groups=groups)).allowed is (
        ok and user == "admin")  # without the mutating webhook's stamp only the exempt pass
    assert msg in r.message


def test_priority_class_resolves_when_priority_not_set():
    assert not admit(handlers(), req(pod(tolerations=[ANY_TOL], pcn="normal")))[1].allowed
    assert admit(handlers(), req(pod(tolerations=[ANY_TOL], pcn="low")))[1].allowed


def test_update_judges_only_added_tolerations():
    h = handlers()
    old = pod(tolerations=[B_TOL])  # e.g. admitted while alice was in team-b
    assert admit(h, req(pod(tolerations=[B_TOL, {"key": "x", "operator": "Exists"}]), op="UPDATE", old=old))[1].allowed
    assert not admit(h, req(pod(tolerations=[{"operator": "Exists"}]), op="UPDATE", old=pod()))[1].allowed


def test_without_configuration_team_tolerations_are_refused():
    h = handlers(None)
    assert h.mutate(req(pod())).allowed
    r = h.validate(req(pod(tolerations=[A_TOL])))
    assert not r.allowed and "not loaded" in r.message
    # cluster admins and built-in controllers keep working before the configuration exists
    admin = h.validate(req(pod(tolerations=[{"operator": "Exists"}]), user="admin", groups=("system:masters",)))
    assert admin.allowed


@pytest.mark.parametrize("kind,obj,tol_path", [
    ("Deployment", {"spec": {"template": {"metadata": {}, "spec": {"containers": []}}}}, ("spec", "template", "spec")),
    ("Job", {"spec": {"template": {"spec": {"containers": []}}}}, ("spec", "template", "spec")),
    ("CronJob", {"spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}}},
     ("spec", "jobTemplate", "spec", "template", "spec")),
])
def test_workload_templates(kind, obj, tol_path):
    obj = {"metadata": {"name": "w"}, **obj}
    r = handlers().mutate(req(obj, kind=kind))
    out = apply_patch(obj, r.patch)
    cur = out
    for p in tol_path:
        cur = cur[p]
    assert cur["tolerations"] == [A_TOL]
    bad = apply_patch(obj, [{"op": "add", "path": "/" + "/".join(tol_path) + "/tolerations", "value": [B_TOL]}])
    assert not admit(handlers(), req(bad, kind=kind))[1].allowed


def test_response_wire_format():
    r = handlers().mutate(req(pod()))
    body = r.response("uid-1")["response"]
    assert body["patchType"] == "JSONPatch"
    assert orjson.loads(base64.b64decode(body["patch"])) == r.patch


def test_judge_ignores_unknown_kinds():
    assert judge(CFG, N, "alice", ("team-a",), "Secret", {}, None, PRIO).allowed
    assert judge(CFG, N, "alice", ("team-a",), "Deployment", {"apiVersion": "example.com/v1"}, None, PRIO).message \
        == "kind Deployment not handled"


def test_patch_for_adds_labels_map_when_missing():
    v = judge(CFG, N, "alice", ("team-a",), "Pod", pod(), None, PRIO)
    ops = patch_for("Pod", pod(), v, N)
    assert {"op": "add", "path": "/metadata/labels", "value": {N.team: "team-a"}} in ops


def test_a_create_the_mutator_never_saw_is_refused_with_the_reason():
    """failurePolicy Ignore on the mutator: a create it did not answer reaches the validator unstamped;
    the refusal says why (not "must be <stamp>, not None") and a retry through both passes."""
    r = handlers().validate(req(pod(tolerations=[A_TOL]), user="alice", groups=("team-a",)))
    assert not r.allowed and "did not answer this request" in r.message and "try again" in r.message
    assert admit(handlers(), req(pod(tolerations=[A_TOL]), user="alice", groups=("team-a",)))[1].allowed
