"""Team capacity on the real local control plane with the real scheduler."""

from __future__ import annotations

import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.kube import CONFIGMAPS, EVENTS, PODS

from teams_e2e_helpers import NAMES, until


def config(env, entries: list[tuple[str, int]], extra: str = "") -> str:
    sel = f"{{{env.select_key}: '{env.id}'}}"
    lines = ["teams:"] + [f"  - {{team: {t}, nodeSelector: {sel}, count: {c}}}" for t, c in entries]
    lines += ["membership:", "  team-a: {groups: [team-a]}", "  team-b: {groups: [team-b]}",
              "  team-c: {groups: [team-c]}", "lowPriority: {below: 0}"]
    return "\n".join(lines) + "\n" + extra


async def converged(env, want: dict[str, int]):
    async def ok():
        c = await env.counts()
        return c if c == want else None
    return await until(ok, 60, f"team counts {want}")


async def pod_state(kube, ns, name):
    p = await kube.get_or_none(PODS, name, ns)
    if p is None:
        return None, "", ""
    cond = next((c for c in p["status"].get("conditions") or [] if c["type"] == "PodScheduled"), {})
    return p["status"].get("phase"), p["spec"].get("nodeName", ""), cond.get("message", "")


async def test_team_pods_land_only_on_own_or_untainted_nodes(env):
    nodes = await env.create_nodes(5)
    await env.write_config(config(env, [("team-a", 2), ("team-b", 2)]))
    await env.start()
    await converged(env, {"team-a": 2, "team-b": 2})
    teams = {n: label for n, (label, _) in (await env.node_teams()).items()}
    alice = await env.user("alice")
    for i in range(5):
        await alice.create(PODS, env.pod(f"a-{i}"), env.namespace)
    # 2 team-a nodes + 1 untainted node fit three 8-GPU pods; team-b's nodes take none
    async def placed():
        states = [await pod_state(env.kube, env.namespace, f"a-{i}") for i in range(5)]
        running = [s for s in states if s[0] == "Running"]
        pending = [s for s in states if s[0] == "Pending" and "untolerated taint" in s[2]]
        return states if len(running) == 3 and len(pending) == 2 else None
    states = await until(placed, 60, "3 pods running, 2 unschedulable")
    used = sorted(teams[s[1]] for s in states if s[1])
    assert used == ["", "team-a", "team-a"], used
    assert all(teams[n] != "team-b" for _, n, _ in states if n)
    pending_msg = next(s[2] for s in states if s[0] == "Pending")
    assert "2 node(s) had untolerated taint" in pending_msg, pending_msg
    # the webhook gave alice's pods team-a's toleration and label, from her identity
    p = await env.kube.get(PODS, "a-0", env.namespace)
    assert {"key": NAMES.team, "operator": "Equal", "value": "team-a", "effect": "NoSchedule"} in p["spec"]["tolerations"]
    assert p["metadata"]["labels"][NAMES.team] == "team-a"
    assert len(nodes) == 5


async def test_low_priority_borrower_is_preempted_by_the_owning_team(env):
    [node] = await env.create_nodes(1)
    low = await env.priority_class(-10)
    await env.write_config(config(env, [("team-b", 1)]))
    await env.start()
    await converged(env, {"team-b": 1})
    alice, bob = await env.user("alice"), await env.user("bob")
    await alice.create(PODS, env.pod("borrower", priority_class=low), env.namespace)

    async def borrower_running():
        s = await pod_state(env.kube, env.namespace, "borrower")
        return s if s[0] == "Running" else None
    assert (await until(borrower_running, 60, "borrower running"))[1] == node
    b = await env.kube.get(PODS, "borrower", env.namespace)
    assert {"key": NAMES.team, "operator": "Exists", "effect": "NoSchedule"} in b["spec"]["tolerations"]
    assert not any(t.get("value") == "team-a" for t in b["spec"]["tolerations"])

    await bob.create(PODS, env.pod("owner"), env.namespace)

    async def owner_running():
        s = await pod_state(env.kube, env.namespace, "owner")
        return s if s[0] == "Running" else None
    assert (await until(owner_running, 90, "team-b's pod running after preemption"))[1] == node
    gone = await env.kube.get_or_none(PODS, "borrower", env.namespace)
    assert gone is None or gone["metadata"].get("deletionTimestamp") or gone["status"].get("phase") in ("Failed", "Succeeded")


@pytest.mark.parametrize("user,tolerations,words", [
    ("alice", [{"key": "fleetkeeper.io/team", "operator": "Equal", "value": "team-b", "effect": "NoSchedule"}],
     "team 'team-b'"),
    ("alice", [{"key": "fleetkeeper.io/team", "operator": "Exists"}], "every team"),
    ("alice", [{"operator": "Exists"}], "every team"),
    ("mallory", [{"key": "fleetkeeper.io/team", "operator": "Equal", "value": "team-a"}], "member of no team"),
])
async def test_foreign_and_any_tolerations_are_rejected(env, user, tolerations, words):
    await env.write_config(config(env, [("team-a", 0), ("team-b", 0)]))
    await env.start()
    client = await env.user(user)
    with pytest.raises(errors.Forbidden) as ei:
        await client.create(PODS, env.pod("sneaky", tolerations=tolerations), env.namespace)
    assert words in ei.value.message and "fleetkeeper teams" in ei.value.message
    assert await env.kube.get_or_none(PODS, "sneaky", env.namespace) is None
    # adding it later by an update is refused too
    await client.create(PODS, env.pod("honest", gpus=0), env.namespace)
    p = await client.get(PODS, "honest", env.namespace)
    with pytest.raises(errors.Forbidden):
        await client.patch(PODS, "honest", [{"op": "add", "path": "/spec/tolerations/-", "value": tolerations[0]}]
                           if p["spec"].get("tolerations") else
                           [{"op": "add", "path": "/spec/tolerations", "value": tolerations}],
                           env.namespace, patch_type="json")


async def test_malformed_configmap_changes_nothing_and_is_reported(env):
    await env.create_nodes(4)
    await env.write_config(config(env, [("team-a", 2)]))
    mgr = await env.start(webhook=False)
    await converged(env, {"team-a": 2})
    before = await env.node_teams()
    await env.write_config(config(env, [("team-a", -3), ("Team B", 1)]))

    async def reported():
        cm = await env.kube.get_or_none(CONFIGMAPS, "fleetkeeper-teams-status", env.namespace)
        st = (cm or {}).get("data", {}).get("status.json", "")
        evs, _ = await env.kube.list(EVENTS, env.namespace)
        ev = [e for e in evs if e.get("reason") == "ConfigInvalid"]
        return (st, ev[0]["note"]) if '"valid": false' in st and ev else None
    status, note = await until(reported, 30, "invalid configuration reported")
    assert "teams[0].count" in status and "teams[1].team" in status
    assert "teams[0].count" in note and "-3" in note and "keeping the last good configuration" in note
    assert mgr.registry.get_sample_value("fleetkeeper_teams_config_valid") == 0
    # the controller has handled it (reported) and still changed nothing
    assert await env.node_teams() == before
    await env.write_config(config(env, [("team-a", 3)]))
    await converged(env, {"team-a": 3})
    assert mgr.registry.get_sample_value("fleetkeeper_teams_config_valid") == 1
    # the two nodes team-a already had are kept
    kept = [n for n, (label, _) in before.items() if label == "team-a"]
    after = await env.node_teams()
    assert all(after[n][0] == "team-a" for n in kept)
    # deleted: the core loader's "absent" for teams is an error like any invalid version; the last good stays
    await env.kube.delete(CONFIGMAPS, "fleetkeeper-teams", env.namespace)

    async def gone_reported():
        cm = await env.kube.get_or_none(CONFIGMAPS, "fleetkeeper-teams-status", env.namespace)
        st = (cm or {}).get("data", {}).get("status.json", "")
        return st if "ConfigMap not found" in st else None
    await until(gone_reported, 30, "the deleted ConfigMap reported")
    assert mgr.registry.get_sample_value("fleetkeeper_teams_config_valid") == 0
    assert await env.node_teams() == after


async def test_restart_in_the_middle_of_a_reassignment_converges_exactly(env):
    await env.create_nodes(16)
    await env.write_config(config(env, [("team-a", 8), ("team-b", 6)]))
    await env.start(webhook=False)
    await converged(env, {"team-a": 8, "team-b": 6})
    before = await env.node_teams()
    await env.stop()
    # a large reassignment, written slowly (1 node/s) so the controller can be killed half-way
    await env.write_config(config(env, [("team-a", 2), ("team-b", 9), ("team-c", 5)],
                                  "writes: {perSecond: 1, burst: 1, concurrency: 1}\n"))
    mgr = await env.start(webhook=False)

    async def some_written():
        return mgr.teams.writes >= 3
    await until(some_written, 60, "a few nodes rewritten")
    first = mgr.teams.writes
    await env.stop()
    mid = await env.counts()  # checks: one team taint at most, label == taint on every node
    assert mid != {"team-a": 2, "team-b": 9, "team-c": 5}, "reassignment finished before the kill"
    await env.write_config(config(env, [("team-a", 2), ("team-b", 9), ("team-c", 5)],
                                  "writes: {perSecond: 50, burst: 50, concurrency: 4}\n"))
    mgr2 = await env.start(webhook=False)
    await converged(env, {"team-a": 2, "team-b": 9, "team-c": 5})
    after = await env.node_teams()
    changed = sum(1 for n in after if after[n][0] != before[n][0])
    # minimal: every write moved a node that had to move, none was written twice
    assert first + mgr2.teams.writes == changed, (first, mgr2.teams.writes, changed)
    assert sum(1 for n in before if before[n][0] == "team-b" and after[n][0] == "team-b") == 6  # b kept all 6
