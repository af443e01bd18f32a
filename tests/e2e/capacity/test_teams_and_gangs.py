"""Team taints and gangs together: a gang of team A never lands partly on
team B's nodes; one too big for team A's nodes waits whole instead of taking
team A's nodes and waiting for the rest."""

from __future__ import annotations

import pytest

from capacity_helpers import NAMES, bound, pods_of, wait_for
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.explain import explain_pod
from fleetkeeper.core import errors
from fleetkeeper.core.kube import PODS, STATEFULSETS


def team_taint(team: str) -> dict:
    return {"key": NAMES.team, "value": team, "effect": "NoSchedule"}


def team_toleration(team: str) -> dict:
    return {"key": NAMES.team, "operator": "Equal", "value": team, "effect": "NoSchedule"}


async def test_team_gang_stays_on_team_nodes(kube, namespace, pool_factory, run_capacity):
    pool = await pool_factory(4, {0: team_taint("team-a"), 1: team_taint("team-a"),
                                  2: team_taint("team-b"), 3: team_taint("team-b")})
    team_a, team_b = set(pool.nodes[:2]), set(pool.nodes[2:])
    await run_capacity(CapacityConfig.model_validate({"balloons": {"enabled": False},
                                                      "gangs": {"webhook_port": 0}}), namespace)
    # what the teams webhook would add for a team-a member
    spec = pool.pod_spec(tolerations=[team_toleration("team-a")])
    big = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "a-big"},
           "spec": {"replicas": 3, "podManagementPolicy": "Parallel", "serviceName": "a-big",
                    "selector": {"matchLabels": {"exp": "a-big"}},
                    "template": {"metadata": {"labels": {"exp": "a-big", NAMES.gang: "a-big"}}, "spec": spec}}}
    await kube.create(STATEFULSETS, big, namespace)

    async def big_waits():
        pods = await pods_of(kube, namespace, "exp=a-big")
        if len(pods) != 3:
            return None
        lines = await explain_pod(kube, NAMES, namespace, pods[0]["metadata"]["name"])
        return (pods, lines) if any("PodGroupScheduled=False" in line for line in lines) else None
    pods, lines = await wait_for(big_waits, 60, what="the 3-node team-a gang waiting whole")
    assert bound(pods) == [], "a gang bigger than team A's nodes must not take part of them"

    # a gang that fits team A (bare pods; its size from the annotation) runs, on team A's nodes only
    for i in range(2):
        await kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                 "metadata": {"name": f"a-small-{i}", "labels": {"exp": "a-small", NAMES.gang: "a-small"},
                                              "annotations": {NAMES.gang_min: "2"}},
                                 "spec": spec}, namespace)

    async def small_runs():
        pods = await pods_of(kube, namespace, "exp=a-small")
        return pods if len(bound(pods)) == 2 else None
    small = await wait_for(small_runs, 60, what="the 2-node team-a gang placed")
    assert {p["spec"]["nodeName"] for p in small} == team_a
    big_pods = await pods_of(kube, namespace, "exp=a-big")
    assert not any(p["spec"].get("nodeName") in team_b for p in big_pods + small)
    assert bound(big_pods) == []

    # a gang name that cannot name a PodGroup is refused at creation, with the reason
    bad = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "bad", "labels": {NAMES.gang: "Team_A"}}, "spec": spec}
    with pytest.raises(errors.ApiError) as exc:
        await kube.create(PODS, bad, namespace)
    assert "must be a DNS label" in str(exc.value) and NAMES.gang in str(exc.value)
