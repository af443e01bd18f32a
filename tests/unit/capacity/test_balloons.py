"""Balloon decisions, table by table."""

from __future__ import annotations

import pytest

from fleetkeeper.capacity import balloons as bl
from fleetkeeper.capacity.config import BalloonConfig, PoolConfig
from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import NodeView, PodView, Taint

N = Names()


def node(name: str, pool: str = "gpu", gpus: int = 8, cpu: int = 94_000, taints=()) -> NodeView:
    return NodeView(name=name, uid="u", resource_version="1", labels={N.pool: pool}, annotations={},
                    taints=tuple(taints), unschedulable=False, conditions=(), gpus=gpus, cpu_millis=cpu,
                    created=0.0, deleting=False)


def pod(name: str, pool: str, node_name: str = "", phase: str = "Running", ns: str = "fk") -> PodView:
    return PodView(namespace=ns, name=name, uid="u", resource_version="1", node=node_name, phase=phase,
                   priority=-5, priority_class="fleetkeeper-balloon", labels={f"{N.domain}/balloon": pool},
                   annotations={}, owner_kind="ReplicaSet", owner_name="x", tolerations=(), gpus=8,
                   deleting=False, created=0.0, scheduled_reason="", scheduled_message="", termination_message="",
                   pod_ip="", scheduler_name="")


@pytest.mark.parametrize("pool,nodes,replicas,request_,problem", [
    (PoolConfig(name="gpu", max_nodes=10), [node("a"), node("b")], 10, {"nvidia.com/gpu": "8"}, ""),
    (PoolConfig(name="gpu"), [node("a"), node("b"), node("c", gpus=4)], 3, {"nvidia.com/gpu": "8"}, ""),
    (PoolConfig(name="gpu", gpus=4), [node("a")], 1, {"nvidia.com/gpu": "4"}, ""),
    (PoolConfig(name="gpu"), [], 0, {}, "no node reports"),
    (PoolConfig(name="gpu", max_nodes=5, gpus=8), [], 5, {"nvidia.com/gpu": "8"}, ""),
    (PoolConfig(name="cpu", resource="cpu"), [node("c", "cpu", 0, 94_000)], 1, {"cpu": "84600m"}, ""),
    (PoolConfig(name="cpu", resource="cpu", cpu_fraction=0.5), [node("c", "cpu", 0, 3_999)], 1, {"cpu": "1900m"}, ""),
    (PoolConfig(name="cpu", resource="cpu"), [], 0, {}, "allocatable cpu"),
])
def test_size_pool(pool, nodes, replicas, request_, problem):
    s = bl.size_pool(pool, nodes)
    assert s.replicas == replicas
    for k, v in request_.items():
        assert s.request[k] == v
    assert (problem in s.problem) if problem else s.problem == ""


def test_deployment_shape():
    cfg = BalloonConfig(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                     {"key": N.quarantine, "operator": "Exists"}])
    s = bl.size_pool(PoolConfig(name="gpu", max_nodes=7), [node("a")])
    d = bl.deployment(s, cfg, N, "fk")
    spec = d["spec"]["template"]["spec"]
    assert d["spec"]["replicas"] == 7
    assert spec["priorityClassName"] == "fleetkeeper-balloon-lowest"
    res = spec["containers"][0]["resources"]
    assert res["requests"] == res["limits"] and res["limits"]["nvidia.com/gpu"] == "8"
    assert "podAntiAffinity" not in spec["affinity"]  # 8 GPUs each on 8-GPU nodes: the request keeps them apart
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0] == {"key": N.pool, "operator": "In", "values": ["gpu"]}
    keys = [t["key"] for t in spec["tolerations"]]
    assert N.team in keys and "nvidia.com/gpu" in keys
    assert N.quarantine not in keys and N.preflight not in keys  # never, even if configured


@pytest.mark.parametrize("pool,nodes,anti", [
    (PoolConfig(name="gpu"), [node("a"), node("b")], False),  # two 8-GPU balloons never fit one 8-GPU node
    (PoolConfig(name="gpu"), [node("a"), node("b"), node("big", gpus=16)], True),  # the 16-GPU node takes two
    (PoolConfig(name="gpu", gpus=4), [node("a")], True),  # half-node balloons
    (PoolConfig(name="gpu", max_nodes=5, gpus=8), [], True),  # nothing known of the nodes yet
    (PoolConfig(name="cpu", resource="cpu"), [node("c", "cpu", 0, 94_000)], False),  # 90 % of the node
    (PoolConfig(name="cpu", resource="cpu", cpu_fraction=0.4), [node("c", "cpu", 0, 94_000)], True),
])
def test_one_balloon_per_node_by_request_or_by_anti_affinity(pool, nodes, anti):
    """Required anti-affinity costs kube-scheduler a check against every existing balloon for each balloon it
    places (minutes at 7,500 nodes); it is kept only where the request alone would let two share a node."""
    spec = bl.deployment(bl.size_pool(pool, nodes), BalloonConfig(), N, "fk")["spec"]["template"]["spec"]
    assert ("podAntiAffinity" in spec["affinity"]) == anti
    if anti:
        term = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term == {"labelSelector": {"matchLabels": {f"{N.domain}/balloon": pool.name}},
                        "topologyKey": "kubernetes.io/hostname"}


def test_priority_class_is_negative_and_never_preempts():
    pc = bl.priority_class(BalloonConfig(), N)
    assert pc["value"] < 0 and pc["preemptionPolicy"] == "Never" and pc["globalDefault"] is False


def test_decide_status_evictions_and_removed_pools():
    cfg = BalloonConfig(pools=[PoolConfig(name="gpu", max_nodes=4)])
    nodes = [node("a"), node("b"), node("q", taints=[Taint(N.quarantine, "xid-79", "NoSchedule")]),
             node("p", taints=[Taint(N.preflight, "pending", "NoSchedule")])]
    pods = [pod("b1", "gpu", "a"), pod("b2", "gpu", "q"), pod("b3", "gpu", "", "Pending"),
            pod("other-ns", "gpu", "b", ns="elsewhere")]
    plan = bl.decide(cfg, N, "fk", nodes, pods, ["balloon-gpu", "balloon-old"])
    assert [d["metadata"]["name"] for d in plan.deployments] == ["balloon-gpu"]
    assert plan.delete_deployments == ["balloon-old"]
    assert [(e.name, e.node) for e in plan.evictions] == [("b2", "q")]
    assert "quarantine" in plan.evictions[0].reason
    st = plan.status[0]
    assert (st.desired, st.running, st.pending) == (4, 2, 1)
    assert st.idle_capacity == 16  # two running balloons x 8 GPUs
    assert st.blocked_nodes == ("p", "q")


def test_decide_disabled_pool_removes_its_deployment():
    cfg = BalloonConfig(pools=[PoolConfig(name="gpu", enabled=False)])
    plan = bl.decide(cfg, N, "fk", [node("a")], [], ["balloon-gpu"])
    assert plan.deployments == [] and plan.delete_deployments == ["balloon-gpu"]


def test_decide_unsizable_pool_is_reported_not_applied():
    cfg = BalloonConfig(pools=[PoolConfig(name="cpu", resource="cpu")])
    plan = bl.decide(cfg, N, "fk", [node("a")], [], [])
    assert plan.deployments == [] and plan.problems


def test_priority_ladder_balloons_are_the_lowest_rung():
    """real work (>= 0) > borrowers (teams' low priority, below 0) > periodic test pods > balloons"""
    from fleetkeeper.preflight.config import PreflightConfig

    balloon = BalloonConfig().priority
    assert balloon < PreflightConfig().periodic.priority < 0
    assert balloon < -100  # the usual borrower priority (the demo's 'any' toleration pods)
