"""Every way around team isolation that was tried, against the real control plane,
each as the user would try it with their own credentials (docs/teams.md,
"Bypasses tried"). Every refusal must name the toleration and the requester's
teams."""

from __future__ import annotations

import copy

import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.attribution import Stamp
from fleetkeeper.core.kube import DEPLOYMENTS, JOBS, PODS, Resource

from teams_e2e_helpers import NAMES, until
from test_teams_e2e import config

REPLICATIONCONTROLLERS = Resource("", "v1", "replicationcontrollers", "ReplicationController", True)
CRONJOBS = Resource("batch", "v1", "cronjobs", "CronJob", True)
A_TOL = {"key": NAMES.team, "operator": "Equal", "value": "team-a", "effect": "NoSchedule"}
ANY_TOL = {"key": NAMES.team, "operator": "Exists", "effect": "NoSchedule"}
BLANKET = {"operator": "Exists"}


def template(env, tolerations=None, priority_class=None) -> dict:
    spec = copy.deepcopy(env.pod("x", gpus=0, priority_class=priority_class, tolerations=tolerations)["spec"])
    return {"metadata": {"labels": {"app": "x"}}, "spec": spec}


def deployment(env, name, **kw) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "x"}}, "template": template(env, **kw)}}


def rc(env, name, **kw) -> dict:
    return {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"app": "x"}, "template": template(env, **kw)}}


def cronjob(env, name, **kw) -> dict:
    t = template(env, **kw)
    t["spec"]["restartPolicy"] = "Never"
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name},
            "spec": {"schedule": "0 0 1 1 *", "jobTemplate": {"spec": {"template": t}}}}


def refused(exc: errors.ApiError, *words: str) -> None:
    msg = exc.message
    assert "fleetkeeper teams" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


async def start(env):
    await env.write_config(config(env, [("team-a", 0), ("team-b", 0)]))
    await env.start()


async def test_priority_flip_rejudges_the_borrowed_toleration(env):
    """Bypass 1: a Deployment created low priority gets the "any" toleration; patching
    priorityClassName to a normal class must not keep it."""
    low, normal = await env.priority_class(-10), await env.priority_class(100)
    await start(env)
    for user, teams in (("alice", "teams: team-a"), ("bob", "teams: team-b"), ("mallory", "member of no team")):
        client = await env.user(user)
        name = f"flip-{user}"
        await client.create(DEPLOYMENTS, deployment(env, name, priority_class=low), env.namespace)
        d = await client.get(DEPLOYMENTS, name, env.namespace)
        assert ANY_TOL in d["spec"]["template"]["spec"]["tolerations"]
        with pytest.raises(errors.Forbidden) as ei:
            await client.patch(DEPLOYMENTS, name, {"spec": {"template": {"spec": {"priorityClassName": normal}}}},
                               env.namespace)
        refused(ei.value, f"{{{NAMES.team} Exists:NoSchedule}}", "every team", "after this update is 100", teams)
        d = await client.get(DEPLOYMENTS, name, env.namespace)
        assert d["spec"]["template"]["spec"]["priorityClassName"] == low  # nothing changed
    # the flip that drops the borrowed toleration is fine: alice's template gets team-a's instead
    alice = await env.user("alice")
    d = await alice.get(DEPLOYMENTS, "flip-alice", env.namespace)
    t = d["spec"]["template"]["spec"]
    await alice.patch(DEPLOYMENTS, "flip-alice", [
        {"op": "replace", "path": "/spec/template/spec/priorityClassName", "value": normal},
        {"op": "replace", "path": "/spec/template/spec/tolerations",
         "value": [x for x in t["tolerations"] if x != ANY_TOL]}], env.namespace, patch_type="json")
    d = await alice.get(DEPLOYMENTS, "flip-alice", env.namespace)
    assert A_TOL in d["spec"]["template"]["spec"]["tolerations"]
    assert ANY_TOL not in d["spec"]["template"]["spec"]["tolerations"]


@pytest.mark.parametrize("user,teams", [("bob", "teams: team-b"), ("mallory", "member of no team")])
async def test_replication_controller_templates_are_judged(env, user, teams):
    """Bypass 2: a ReplicationController with {operator: Exists} was not admitted at all."""
    await start(env)
    client = await env.user(user)
    for tols, words in (([BLANKET], "every team"), ([A_TOL], "team 'team-a'")):
        with pytest.raises(errors.Forbidden) as ei:
            await client.create(REPLICATIONCONTROLLERS, rc(env, "rc", tolerations=tols), env.namespace)
        refused(ei.value, words, teams)
    assert await env.kube.get_or_none(REPLICATIONCONTROLLERS, "rc", env.namespace) is None
    # an honest RC is admitted and stamped, and gets its author's team (if any)
    await client.create(REPLICATIONCONTROLLERS, rc(env, "ok"), env.namespace)
    got = await env.kube.get(REPLICATIONCONTROLLERS, "ok", env.namespace)
    assert Stamp.decode(got["metadata"]["annotations"][NAMES.requester]).user == user
    # and a blanket toleration cannot be added to it later
    with pytest.raises(errors.Forbidden) as ei:
        await client.patch(REPLICATIONCONTROLLERS, "ok", {"spec": {"template": {"spec": {"tolerations": [BLANKET]}}}},
                           env.namespace)
    refused(ei.value, "every team", teams)


@pytest.mark.parametrize("tol", [
    {"key": "fleetkeeper.io/preflight", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "fleetkeeper.io/quarantine", "operator": "Exists"},
    {"key": "fleetkeeper.io/preflight-gate", "operator": "Equal", "value": "x", "effect": "NoSchedule"},
])
async def test_lifecycle_taints_only_for_exempt_requesters(env, tol):
    """Bypass 3: a pod tolerating fleetkeeper's own preflight/quarantine taints could sit on
    a node being validated or quarantined."""
    low = await env.priority_class(-10)
    await start(env)
    alice = await env.user("alice")
    for kind, body in ((PODS, env.pod("lc-pod", gpus=0, tolerations=[tol])),
                       (PODS, env.pod("lc-low", gpus=0, tolerations=[tol], priority_class=low)),
                       (DEPLOYMENTS, deployment(env, "lc-deploy", tolerations=[tol])),
                       (REPLICATIONCONTROLLERS, rc(env, "lc-rc", tolerations=[tol]))):
        with pytest.raises(errors.Forbidden) as ei:
            await alice.create(kind, body, env.namespace)
        refused(ei.value, tol["key"], "lifecycle", "teams: team-a")
    # a cluster admin (exempt) may
    await env.kube.create(PODS, env.pod("lc-admin", gpus=0, tolerations=[tol]), env.namespace)


async def test_cronjob_template_edit_and_update_paths(env):
    await start(env)
    bob = await env.user("bob")
    await bob.create(CRONJOBS, cronjob(env, "cj"), env.namespace)
    cj = await bob.get(CRONJOBS, "cj", env.namespace)
    tols = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["tolerations"]
    assert tols == [{**A_TOL, "value": "team-b"}]
    for added, words in ((A_TOL, "team 'team-a'"), (BLANKET, "every team")):
        with pytest.raises(errors.Forbidden) as ei:
            await bob.patch(CRONJOBS, "cj", [{"op": "add", "path": "/spec/jobTemplate/spec/template/spec/tolerations/-",
                                              "value": added}], env.namespace, patch_type="json")
        refused(ei.value, words, "teams: team-b")
    # a Job (any built-in kind) naming another team is refused on CREATE
    t = template(env, tolerations=[A_TOL])
    t["spec"]["restartPolicy"] = "Never"
    with pytest.raises(errors.Forbidden) as ei:
        await bob.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                                "spec": {"template": t}}, env.namespace)
    refused(ei.value, "team 'team-a'", "teams: team-b")


async def test_the_requester_stamp_cannot_be_forged(env):
    await start(env)
    bob = await env.user("bob")
    forged = deployment(env, "forged")
    forged["metadata"]["annotations"] = {NAMES.requester: Stamp("alice", ("team-a",)).encode()}
    await bob.create(DEPLOYMENTS, forged, env.namespace)
    got = await env.kube.get(DEPLOYMENTS, "forged", env.namespace)
    assert Stamp.decode(got["metadata"]["annotations"][NAMES.requester]) == Stamp("bob", ("team-b",))
    # changing it by an update: the mutating webhook puts the recorded value back
    await bob.patch(DEPLOYMENTS, "forged", {"metadata": {"annotations": {
        NAMES.requester: Stamp("bob", ("team-a",)).encode()}}}, env.namespace)
    got2 = await env.kube.get(DEPLOYMENTS, "forged", env.namespace)
    assert got2["metadata"]["annotations"][NAMES.requester] == got["metadata"]["annotations"][NAMES.requester]


async def test_pods_of_built_in_controllers_keep_their_authors_team(env):
    """A Deployment's pods (created by kube-system controllers, which skip the webhook)
    carry exactly the team toleration of the Deployment's author."""
    await env.create_nodes(2)
    await env.write_config(config(env, [("team-a", 1)]))
    await env.start()
    alice = await env.user("alice")
    await alice.create(DEPLOYMENTS, deployment(env, "web"), env.namespace)

    async def pods():
        items, _ = await env.kube.list(PODS, env.namespace, label_selector="app=x")
        return items or None
    [p] = await until(pods, 60, "the Deployment's pod")
    team_tols = [t for t in p["spec"]["tolerations"] if t.get("key") == NAMES.team]
    assert team_tols == [A_TOL]


async def test_a_hand_written_owner_reference_does_not_lend_a_team(env):
    """Bypass 7: bob points his pod's ownerReference at alice's Deployment to be judged as alice."""
    await start(env)
    alice, bob = await env.user("alice"), await env.user("bob")
    await alice.create(DEPLOYMENTS, deployment(env, "alices"), env.namespace)
    d = await env.kube.get(DEPLOYMENTS, "alices", env.namespace)
    pod = env.pod("borrowed", gpus=0, tolerations=[A_TOL])
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "alices",
                                           "uid": d["metadata"]["uid"], "controller": True}]
    with pytest.raises(errors.Forbidden) as ei:
        await bob.create(PODS, pod, env.namespace)
    refused(ei.value, "team 'team-a'", "teams: team-b")
