"""Periodic re-tests treat a node held only by a balloon as idle: a balloon is a
placeholder that keeps the node warm, not work, so the node is still re-tested."""

from __future__ import annotations

from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import Condition, NodeView, PodView
from fleetkeeper.preflight import periodic
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.keys import Keys

K = Keys(Names())
CFG = PreflightConfig.model_validate({"periodic": {"period_s": 1000, "min_idle_s": 60, "max_concurrent": 5}})
NOW = 1_800_000_000.0


def node(name: str) -> NodeView:
    return NodeView(name, "uid-" + name, "7", {}, {K.validated_at: str(int(NOW - 5000))}, (), False,
                    (Condition("Ready", "True", "", "", 0),), 8, 94000, NOW - 10_000, False)


def pod(name: str, node_name: str, labels: dict, owner: str = "ReplicaSet") -> PodView:
    return PodView("ns", name, "u-" + name, "1", node_name, "Running", -1000, "", labels, {}, owner, "rs", (), 8,
                   False, NOW - 500, "", "", "", "", "")


def test_a_balloon_is_not_real_work():
    balloon = pod("balloon-gpu-x", "a", {Names().balloon: "gpu"})
    work = pod("train-0", "b", {"app": "train"})
    assert not periodic.is_real_work(balloon, K)
    assert periodic.is_real_work(work, K)


def test_nodes_under_balloons_are_retested_busy_nodes_are_not():
    nodes = [node("a"), node("b"), node("c")]
    pods = {"a": [pod("balloon-gpu-x", "a", {Names().balloon: "gpu"})],
            "b": [pod("train-0", "b", {"app": "train"})]}
    plan = periodic.decide(nodes, pods, {n.name: 0.0 for n in nodes}, CFG, K, NOW)
    assert sorted(plan.start) == ["a", "c"]
