"""Gang decisions and the pod mutation, table by table."""

from __future__ import annotations

import base64

import orjson
import pytest

from fleetkeeper.capacity import gangs as gg
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import parse_time
from fleetkeeper.core.kube import COSCHED_PODGROUPS, PODGROUPS, WORKLOADS
from fleetkeeper.core.webhook import AdmissionRequest

N = Names()
NOW = 1_800_000_000.0
IN_TREE = CapacityConfig()
COSCHED = CapacityConfig.model_validate({"gangs": {"backend": "coscheduling"}})
BOTH = CapacityConfig.model_validate({"gangs": {"backend": "both", "coscheduling_scheduler_name": "sp"}})


def member(name: str, node: str = "", phase: str = "Pending", gang: str = "g", min_: str = "", created: float = NOW - 60,
           owner: str = "Job", group: str = "g", deleting: bool = False, gated: bool = False) -> gg.GangPod:
    return gg.GangPod(namespace="ns", name=name, uid=f"u-{name}", gang=gang, min_members=min_, node=node, phase=phase,
                      deleting=deleting, created=created, owner_kind=owner, owner_name="train" if owner else "",
                      owner_uid="ou" if owner else "", owner_api_version="batch/v1" if owner else "",
                      scheduling_group=group, cosched_group="", scheduled_message="", gated=gated)


JOB = gg.Owner("Job", "train", "ou", "batch/v1", 4)


@pytest.mark.parametrize("pods,owner,now,expect", [
    ([member("a", min_="3")], JOB, NOW, (3, "annotation", None)),
    ([member("a", min_="x")], JOB, NOW, (4, "Job parallelism", None)),
    ([member("a", min_="2"), member("b", min_="5")], JOB, NOW, (5, "annotation", None)),
    ([member("a")], JOB, NOW, (4, "Job parallelism", None)),
    ([member("a", owner=""), member("b", owner="")], None, NOW, (2, "members seen", None)),
    ([member("a", owner="", created=NOW - 1)], None, NOW, (None, "", 4.0)),
    ([member("a", owner="")], gg.Owner("Job", "train", "ou", "batch/v1", None), NOW, (1, "members seen", None)),
])
def test_resolve_min(pods, owner, now, expect):
    n, src, wait, _ = gg.resolve_min(pods, owner, now, settle=5.0)
    assert (n, src, wait) == expect


@pytest.mark.parametrize("kind,spec,expect", [
    ("Job", {"parallelism": 8, "completions": 8}, 8),
    ("Job", {"parallelism": 8, "completions": 3}, 3),
    ("Job", {}, 1),
    ("StatefulSet", {"replicas": 16}, 16),
    ("ReplicaSet", {}, 1),
    ("DaemonSet", {}, None),
])
def test_owner_replicas(kind, spec, expect):
    assert gg.owner_replicas(kind, {"spec": spec}) == expect


def test_owner_problem_ordered_statefulset():
    assert "Parallel" in gg.owner_problem("StatefulSet", {"spec": {}})
    assert gg.owner_problem("StatefulSet", {"spec": {"podManagementPolicy": "Parallel"}}) == ""


@pytest.mark.parametrize("pods,node_ok,state,text", [
    ([member("a"), member("b")], {}, "Waiting", "2 of 3 members exist"),
    ([member("a"), member("b"), member("c")], {}, "Waiting", "0/3 members placed"),
    ([member("a", "n1", "Running"), member("b", "n2", "Running"), member("c", "n3", "Running")],
     {"n1": True, "n2": True, "n3": True}, "Running", "3/3 members placed, 3 running"),
    ([member("a", "n1", "Running"), member("b", "n2", "Running"), member("c", "n3", "Running")],
     {"n1": True, "n2": False, "n3": True}, "Broken", "b on n2 (NotReady)"),
    ([member("a", "n1", "Running"), member("b", "n2", "Running"), member("c", "n3", "Running")],
     {"n1": True, "n2": True}, "Broken", "c on n3 (node gone)"),
    ([member("a", "n1", "Running"), member("b", "n2", "Running"), member("c", "n3", "Failed")],
     {"n1": True, "n2": True}, "Broken", "restart whole"),
    ([member("a", "n1", "Succeeded"), member("b", "n2", "Succeeded"), member("c", "n3", "Succeeded")],
     {}, "Completed", "3 members succeeded"),
    ([member("a", "n1", "Succeeded"), member("b", "n2", "Failed"), member("c", "n3", "Failed")],
     {}, "Failed", "2 members failed"),
])
def test_gang_state(pods, node_ok, state, text):
    s, msg = gg.gang_state(pods, 3, node_ok, None)
    assert s == state and text in msg, msg


def test_gang_state_quotes_the_scheduler():
    group = {"status": {"conditions": [{"type": "PodGroupScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "pod group is unschedulable"}]}}
    s, msg = gg.gang_state([member("a"), member("b")], 2, {}, group)
    assert s == "Waiting" and "pod group is unschedulable" in msg


def test_decide_creates_workload_and_podgroup_owned_by_the_job():
    # 2 of the Job's 4 members: the Workload now, the PodGroup once all exist and fit (hold_until_room_members)
    part = gg.decide_gang("ns/g", [member("a"), member("b")], JOB, gg.GroupObjects(), {}, IN_TREE, N, NOW, None)
    assert {res.kind for res, _ in part.create} == {"Workload"} and "all 4 members exist" in part.held
    plan = gg.decide_gang("ns/g", [member(n) for n in "abcd"], JOB, gg.GroupObjects(), {}, IN_TREE, N, NOW, None)
    kinds = {res.kind: body for res, body in plan.create}
    assert set(kinds) == {"Workload", "PodGroup"}
    pg = kinds["PodGroup"]
    assert pg["spec"]["schedulingPolicy"]["gang"]["minCount"] == 4
    assert pg["spec"]["podGroupTemplateRef"]["workload"]["workloadName"] == "g"
    assert pg["metadata"]["ownerReferences"][0]["uid"] == "ou"
    assert kinds["Workload"]["spec"]["controllerRef"] == {"apiGroup": "batch", "kind": "Job", "name": "train"}
    assert plan.state == "Waiting" and plan.size_source == "Job parallelism"


def test_decide_coscheduling_podgroup_and_labels():
    pods = [member("a"), member("b", node="n1", phase="Running")]
    plan = gg.decide_gang("ns/g", pods, JOB, gg.GroupObjects(), {"n1": True}, COSCHED, N, NOW, None)
    assert [(r.kind, r.group) for r, _ in plan.create] == [("PodGroup", "scheduling.x-k8s.io")]
    assert plan.create[0][1]["spec"] == {"minMember": 4, "scheduleTimeoutSeconds": 600}
    assert plan.patch_labels == ["a"]  # unplaced members without the coscheduling label


def test_decide_existing_groups_not_recreated():
    objs = gg.GroupObjects(workload=gg.workload_body("ns", "g", 4, JOB, N), podgroup=gg.podgroup_body("ns", "g", 4, JOB, N))
    plan = gg.decide_gang("ns/g", [member("a")], JOB, objs, {}, IN_TREE, N, NOW, None)
    assert plan.create == [] and plan.delete == []


def test_decide_size_change_recreates_only_while_nothing_is_placed():
    objs = gg.GroupObjects(workload=gg.workload_body("ns", "g", 2, JOB, N), podgroup=gg.podgroup_body("ns", "g", 2, JOB, N))
    plan = gg.decide_gang("ns/g", [member("a")], JOB, objs, {}, IN_TREE, N, NOW, None)
    assert {r.kind for r, _ in plan.delete} == {"Workload", "PodGroup"} and plan.requeue_after
    plan = gg.decide_gang("ns/g", [member("a", "n1", "Running")], JOB, objs, {"n1": True}, IN_TREE, N, NOW, None)
    assert plan.delete == [] and any("immutable" in p for p in plan.problems)


def test_decide_cleanup_after_grace_only_of_own_objects():
    mine = gg.podgroup_body("ns", "g", 2, JOB, N)
    objs = gg.GroupObjects(workload=gg.workload_body("ns", "g", 2, JOB, N), podgroup=mine)
    cfg = CapacityConfig.model_validate({"gangs": {"cleanup_grace_seconds": 30}})
    plan = gg.decide_gang("ns/g", [], None, objs, {}, cfg, N, NOW, NOW - 10)
    assert plan.delete == [] and plan.requeue_after == pytest.approx(20)
    plan = gg.decide_gang("ns/g", [], None, objs, {}, cfg, N, NOW, NOW - 31)
    assert [(r, n) for r, n in plan.delete] == [(PODGROUPS, "g"), (WORKLOADS, "g")] and plan.state == "Deleted"
    foreign = {"metadata": {"name": "g", "labels": {}}, "spec": {"minMember": 2}}
    plan = gg.decide_gang("ns/g", [], None, gg.GroupObjects(cosched=foreign), {}, cfg, N, NOW, NOW - 100)
    assert plan.delete == []  # not created by fleetkeeper: left alone
    assert COSCHED_PODGROUPS  # (the same path handles coscheduling groups)


def test_decide_bare_pods_wait_to_settle():
    pods = [member("a", owner="", created=NOW - 1), member("b", owner="", created=NOW - 2)]
    plan = gg.decide_gang("ns/g", pods, None, gg.GroupObjects(), {}, IN_TREE, N, NOW, None)
    assert plan.create == [] and plan.requeue_after == pytest.approx(4.0)


def test_decide_reports_members_without_group_reference():
    plan = gg.decide_gang("ns/g", [member("a", group=""), member("b")], JOB, gg.GroupObjects(), {}, IN_TREE, N, NOW, None)
    assert plan.not_in_group == ["a"] and "recreate" in plan.message


def test_state_change_detected_from_annotation():
    pg = gg.podgroup_body("ns", "g", 1, JOB, N)
    pg["metadata"]["annotations"] = {gg.state_annotation(N): "Waiting"}
    plan = gg.decide_gang("ns/g", [member("a", "n1", "Running", min_="1")], JOB, gg.GroupObjects(podgroup=pg,
                          workload=gg.workload_body("ns", "g", 1, JOB, N)), {"n1": True}, IN_TREE, N, NOW, None)
    assert plan.previous_state == "Waiting" and plan.state == "Running" and plan.state_changed


def test_group_min_of_each_kind():
    assert gg.group_min(gg.podgroup_body("ns", "g", 3, None, N)) == 3
    assert gg.group_min(gg.workload_body("ns", "g", 5, None, N)) == 5
    assert gg.group_min(gg.cosched_body("ns", "g", 7, None, N, 60)) == 7
    assert gg.group_min(None) is None


def review(labels: dict | None, annotations: dict | None = None, spec: dict | None = None, op: str = "CREATE",
           kind: str = "Pod") -> AdmissionRequest:
    obj = {"metadata": {"name": "p", "labels": labels or {}, "annotations": annotations or {}},
           "spec": spec or {"containers": [{"name": "c"}]}}
    return AdmissionRequest.from_review({"request": {"uid": "1", "kind": {"kind": kind}, "operation": op,
                                                     "namespace": "ns", "object": obj, "userInfo": {}}})


@pytest.mark.parametrize("req,cfg,allowed,patch_paths", [
    (review({}), IN_TREE, True, []),
    (review({N.gang: "exp-a"}), IN_TREE, True, ["/spec/schedulingGroup", "/spec/schedulingGates"]),
    (review({N.gang: "exp-a"}, spec={"schedulingGroup": {"podGroupName": "exp-a"}}), IN_TREE, True,
     ["/spec/schedulingGates"]),
    (review({N.gang: "exp-a"}, spec={"schedulingGroup": {"podGroupName": "exp-a"},
                                     "schedulingGates": [{"name": N.gang_gate}]}), IN_TREE, True, []),
    (review({N.gang: "exp-a"}, spec={"schedulingGates": [{"name": "other.io/quota"}]}), IN_TREE, True,
     ["/spec/schedulingGroup", "/spec/schedulingGates/-"]),
    (review({N.gang: "exp-a"}), CapacityConfig.model_validate({"gangs": {"hold_until_room_members": None}}), True,
     ["/spec/schedulingGroup"]),
    (review({N.gang: "exp-a"}), CapacityConfig.model_validate({"gangs": {"gate_held_members": False}}), True,
     ["/spec/schedulingGroup"]),
    (review({N.gang: "Exp_A"}), IN_TREE, False, []),
    (review({N.gang: "exp-a"}, {N.gang_min: "zero"}), IN_TREE, False, []),
    (review({N.gang: "exp-a"}, {N.gang_min: "4"}), IN_TREE, True, ["/spec/schedulingGroup", "/spec/schedulingGates"]),
    (review({N.gang: "exp-a"}), COSCHED, True, ["/metadata/labels/scheduling.x-k8s.io~1pod-group"]),
    (review({N.gang: "exp-a"}), BOTH, True, ["/spec/schedulingGroup", "/spec/schedulingGates",
                                             "/metadata/labels/scheduling.x-k8s.io~1pod-group", "/spec/schedulerName"]),
    (review({N.gang: "exp-a"}, op="UPDATE"), IN_TREE, True, []),
    (review({N.gang: "exp-a"}, kind="Node"), IN_TREE, True, []),
])
def test_mutate_pod(req, cfg, allowed, patch_paths):
    adm = gg.mutate_pod(req, cfg, N)
    assert adm.allowed is allowed
    assert [op["path"] for op in adm.patch] == patch_paths
    if patch_paths and patch_paths[0] == "/spec/schedulingGroup":
        assert adm.patch[0]["value"] == {"podGroupName": "exp-a"}
        resp = adm.response("1")["response"]
        assert orjson.loads(base64.b64decode(resp["patch"]))[0]["path"] == "/spec/schedulingGroup"
    if not allowed:
        assert N.gang in adm.message or N.gang_min in adm.message


def test_mutate_pod_warns_on_foreign_group():
    adm = gg.mutate_pod(review({N.gang: "exp-a"}, spec={"schedulingGroup": {"podGroupName": "other"}}), IN_TREE, N)
    assert adm.allowed and adm.patch == [] and adm.warnings


def test_projection_reads_the_group_reference():
    obj = {"metadata": {"name": "p", "namespace": "ns", "labels": {N.gang: "g"}, "annotations": {N.gang_min: "2"},
                        "ownerReferences": [{"kind": "Job", "name": "j", "uid": "u", "apiVersion": "batch/v1",
                                             "controller": True}], "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"schedulingGroup": {"podGroupName": "g"}, "nodeName": "n"},
           "status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}}
    p = gg.gang_pod_projector(N)(obj)
    assert (p.key, p.scheduling_group, p.min_members, p.owner_kind, p.owner_uid, p.node) == \
        ("ns/g", "g", "2", "Job", "u", "n")


def test_decide_creates_nothing_for_a_gang_being_deleted():
    pods = [member("a", deleting=True), member("b", "n1", "Running", deleting=True)]
    plan = gg.decide_gang("ns/g", pods, JOB, gg.GroupObjects(), {"n1": True}, IN_TREE, N, NOW, None)
    assert plan.create == [] and plan.delete == [] and plan.state == ""


@pytest.mark.parametrize("pods,state,text", [
    # two members, min 2: the first finished, the second still runs -> still Running
    ([member("a", "n1", "Succeeded"), member("b", "n2", "Running")], "Running", "2/2 members placed, 1 running, 1 succeeded"),
    ([member("a", "n1", "Succeeded"), member("b", "n2", "Succeeded")], "Completed", "2 members succeeded"),
    # none placed yet: waiting, succeeded members of nobody do not count
    ([member("a"), member("b")], "Waiting", "0/2 members placed"),
])
def test_gang_state_counts_succeeded_members(pods, state, text):
    s, msg = gg.gang_state(pods, 2, {"n1": True, "n2": True}, None)
    assert s == state and text in msg, msg


def test_decide_keeps_running_while_the_last_member_runs():
    objs = gg.GroupObjects(workload=gg.workload_body("ns", "g", 2, JOB, N), podgroup=gg.podgroup_body("ns", "g", 2, JOB, N))
    pods = [member("a", "n1", "Succeeded", min_="2"), member("b", "n2", "Running", min_="2")]
    plan = gg.decide_gang("ns/g", pods, JOB, objs, {"n1": True, "n2": True}, IN_TREE, N, NOW, None)
    assert plan.state == "Running"


@pytest.mark.parametrize("owner", [
    gg.Owner("Job", "train", "ou", "batch/v1", None, gone=True),
    gg.Owner("Job", "train", "ou", "batch/v1", 32, deleting=True),
])
def test_decide_never_creates_groups_for_an_owner_gone_or_being_deleted(owner):
    # the Job was deleted (background propagation): 13 of its 32 pods are still there, not yet deleting
    pods = [member(f"p{i}", f"n{i}", "Succeeded") for i in range(13)]
    plan = gg.decide_gang("ns/g", pods, owner, gg.GroupObjects(), {}, IN_TREE, N, NOW, None)
    assert plan.create == [] and plan.min_count is None
    assert ("gone" if owner.gone else "being deleted") in plan.message


# --- large gangs: the PodGroup waits until the gang fits (hold_podgroup) ----------------------------------

HOLD = CapacityConfig.model_validate({"gangs": {"hold_until_room_members": 3, "hold_unjudged_seconds": 30}})
BIG = gg.Owner("Job", "train", "ou", "batch/v1", 3)


def kinds_created(plan: gg.GangPlan) -> set[str]:
    return {res.kind for res, _ in plan.create}


@pytest.mark.parametrize("room,held", [
    (gg.ROOM_BLOCKED, True),   # fits the pool, not now: no PodGroup, no pod group cycles that cannot succeed
    (gg.ROOM_FITS, False),     # the simulation places it whole: the scheduler gets it now
    (gg.ROOM_UNFIT, False),    # no pool fleetkeeper knows can take it: kube-scheduler's call
])
def test_large_gang_gets_its_podgroup_only_once_it_fits(room, held):
    pods = [member(n, created=NOW - 5) for n in "abc"]
    plan = gg.decide_gang("ns/g", pods, BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None, room=room)
    assert kinds_created(plan) == ({"Workload"} if held else {"Workload", "PodGroup"})
    assert bool(plan.held) == held
    assert ("room for all 3 members" in plan.message) == held


def test_large_gang_not_judged_gets_its_podgroup_after_the_grace():
    pods = [member(n, created=NOW - 10) for n in "abc"]
    plan = gg.decide_gang("ns/g", pods, BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None, room=None)
    assert kinds_created(plan) == {"Workload"} and plan.requeue_after == pytest.approx(20)
    later = gg.decide_gang("ns/g", pods, BIG, gg.GroupObjects(), {}, HOLD, N, NOW + 20, None, room=None)
    assert kinds_created(later) == {"Workload", "PodGroup"} and not later.held


def test_a_gang_a_later_pass_left_out_is_no_pools_work_and_gets_its_podgroup():
    """No verdict although a balloon pass ran after the last member appeared: no pool took it (it asks for
    no pool fleetkeeper knows, or there are none), so kube-scheduler decides at once, not after the grace."""
    wl = gg.GroupObjects(workload={"metadata": {"name": "g", "creationTimestamp": "2027-01-15T08:00:00Z"}})
    made = parse_time("2027-01-15T08:00:00Z")
    pods = [member(n, created=made - 1) for n in "abc"]
    early = gg.decide_gang("ns/g", pods, BIG, wl, {}, HOLD, N, NOW, None, room=None,
                           judged_at=made + gg.JUDGE_MARGIN - 1)  # that pass may not have seen the Workload
    assert early.held and "PodGroup" not in kinds_created(early)
    judged = gg.decide_gang("ns/g", pods, BIG, wl, {}, HOLD, N, NOW, None, room=None,
                            judged_at=made + gg.JUDGE_MARGIN)
    assert not judged.held and "PodGroup" in kinds_created(judged)


def test_a_pass_before_the_gangs_workload_existed_did_not_judge_it():
    """The pass counts a gang that is complete but untried only once its group object is in the informer
    (``complete``); a pass that ran before left it out for want of it. Taking that for "no pool's work" let
    small gangs go (their PodGroups created) onto room the pass was keeping for an older, larger gang."""
    pods = [member(n, created=NOW - 10) for n in "abc"]
    plan = gg.decide_gang("ns/g", pods, BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None, room=None,
                          judged_at=NOW - 1)
    assert plan.held and kinds_created(plan) == {"Workload"} and plan.requeue_after == pytest.approx(20)


def test_large_gang_held_until_all_members_exist():
    plan = gg.decide_gang("ns/g", [member("a"), member("b")], BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None,
                          room=None)
    assert kinds_created(plan) == {"Workload"} and plan.held and plan.requeue_after is None


@pytest.mark.parametrize("cfg,pods,objs", [
    (CapacityConfig.model_validate({"gangs": {"hold_until_room_members": 4}}), "abc", gg.GroupObjects()),  # small
    (CapacityConfig.model_validate({"gangs": {"hold_until_room_members": None}}), "abc", gg.GroupObjects()),
    (HOLD, "abc", gg.GroupObjects(podgroup={"metadata": {"name": "g"}})),  # already there: left as is
    (HOLD, "ab+", gg.GroupObjects()),  # a member is placed: the gang is the scheduler's already
])
def test_hold_does_not_apply(cfg, pods, objs):
    ms = [member(n) if n != "+" else member("c", node="n1", phase="Running") for n in pods]
    plan = gg.decide_gang("ns/g", ms, BIG, objs, {"n1": True}, cfg, N, NOW, None, room=gg.ROOM_BLOCKED)
    assert not plan.held
    if objs.podgroup is None:
        assert "PodGroup" in kinds_created(plan)


def test_room_verdicts_from_the_pass():
    from fleetkeeper.capacity import yielding as yd
    from fleetkeeper.capacity.controller import room_verdicts
    a = yd.PoolYield("a", fits=["ns/fits", "ns/leaving"], free=["ns/fits"], blocked=["ns/both", "ns/blocked"],
                     unfit=["ns/both", "ns/other"], over_budget=["ns/budget"])
    b = yd.PoolYield("b", fits=["ns/both"], free=["ns/both"], unfit=["ns/unfit"])
    # leaving: fits through balloons released for it that are still there: its PodGroup waits for them
    assert room_verdicts([a, b]) == {"ns/fits": gg.ROOM_FITS, "ns/both": gg.ROOM_FITS, "ns/blocked": gg.ROOM_BLOCKED,
                                     "ns/budget": gg.ROOM_BLOCKED, "ns/other": gg.ROOM_UNFIT,
                                     "ns/unfit": gg.ROOM_UNFIT, "ns/leaving": gg.ROOM_BLOCKED}


# --- the gang gate: held members are out of kube-scheduler's reach until the gang is not held -------------

def test_webhook_gates_members_but_not_in_dry_run():
    adm = gg.mutate_pod(review({N.gang: "exp-a"}), IN_TREE, N)
    assert {"op": "add", "path": "/spec/schedulingGates", "value": [{"name": N.gang_gate}]} in adm.patch
    other = gg.mutate_pod(review({N.gang: "exp-a"}, spec={"schedulingGates": [{"name": "other.io/quota"}]}), IN_TREE, N)
    assert {"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": N.gang_gate}} in other.patch
    dry = gg.mutate_pod(review({N.gang: "exp-a"}), IN_TREE, N, gate=False)
    assert [op["path"] for op in dry.patch] == ["/spec/schedulingGroup"]
    assert gg.mutate_pod(review({N.gang: "exp-a"}), COSCHED, N).patch[0]["path"] != "/spec/schedulingGates"


def test_held_gang_keeps_its_gates():
    pods = [member(n, created=NOW - 5, gated=True) for n in "abc"]
    plan = gg.decide_gang("ns/g", pods, BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None, room=gg.ROOM_BLOCKED)
    assert plan.held and plan.ungate == [] and kinds_created(plan) == {"Workload"}


def test_gang_no_longer_held_is_ungated_first_and_gets_its_podgroup_once_no_gate_is_left():
    gated = [member(n, created=NOW - 5, gated=True) for n in "abc"]
    plan = gg.decide_gang("ns/g", gated, BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None, room=gg.ROOM_FITS)
    assert not plan.held and plan.ungate == ["a", "b", "c"]
    assert kinds_created(plan) == {"Workload"}, "a PodGroup seen while members are gated runs a cycle short of them"
    assert plan.requeue_after is not None
    half = [member("a", created=NOW - 5), member("b", created=NOW - 5, gated=True), member("c", created=NOW - 5)]
    assert gg.decide_gang("ns/g", half, BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None, room=gg.ROOM_FITS).ungate == ["b"]
    free = [member(n, created=NOW - 5) for n in "abc"]
    after = gg.decide_gang("ns/g", free, BIG, gg.GroupObjects(), {}, HOLD, N, NOW, None, room=gg.ROOM_FITS)
    assert after.ungate == [] and kinds_created(after) == {"Workload", "PodGroup"}


@pytest.mark.parametrize("cfg,objs", [
    (CapacityConfig.model_validate({"gangs": {"hold_until_room_members": None}}), gg.GroupObjects()),  # hold off
    (HOLD, gg.GroupObjects(podgroup={"metadata": {"name": "g"}})),  # a member the Job made again after a failure
])
def test_gated_members_of_a_gang_not_held_are_ungated(cfg, objs):
    pods = [member("a", created=NOW - 5, gated=True), member("b", created=NOW - 5), member("c", created=NOW - 5)]
    plan = gg.decide_gang("ns/g", pods, BIG, objs, {}, cfg, N, NOW, None, room=gg.ROOM_BLOCKED)
    assert not plan.held and plan.ungate == ["a"]


def test_projection_reads_the_gate_and_skips_the_gated_condition():
    obj = {"metadata": {"name": "p", "namespace": "ns", "labels": {N.gang: "g"}},
           "spec": {"schedulingGroup": {"podGroupName": "g"},
                    "schedulingGates": [{"name": "other.io/quota"}, {"name": N.gang_gate}]},
           "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                          "reason": "SchedulingGated",
                                                          "message": "Scheduling is blocked due to non-empty "
                                                                     "scheduling gates"}]}}
    p = gg.gang_pod_projector(N)(obj)
    assert p.gated and p.scheduled_message == ""
    obj["spec"]["schedulingGates"] = [{"name": "other.io/quota"}]
    assert not gg.gang_pod_projector(N)(obj).gated


def test_waiting_pod_own_gate_is_neither_gated_nor_tried():
    from fleetkeeper.capacity import yielding as yd
    obj = {"metadata": {"name": "p", "namespace": "ns", "labels": {N.gang: "g"}, "creationTimestamp": None},
           "spec": {"schedulingGroup": {"podGroupName": "g"}, "schedulingGates": [{"name": N.gang_gate}],
                    "priority": 10, "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
           "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                          "reason": "SchedulingGated"}]}}
    w = yd.waiting_pod_projector(N)(obj)
    assert not w.gated and not w.tried
    obj["spec"]["schedulingGates"].append({"name": "other.io/quota"})
    assert yd.waiting_pod_projector(N)(obj).gated
