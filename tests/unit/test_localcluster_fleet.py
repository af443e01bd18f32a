"""What simulated nodes look like when they register."""

from __future__ import annotations

from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest


def test_the_starting_fleet_registers_ready_and_untainted():
    """The cluster's starting fleet has joined already: Ready, no not-ready taint to lift, and the labels a
    kubelet sets, so the controller manager has no write to make per node."""
    n = node_manifest(FleetSpec(nodes=4, ready=True), 0)
    assert n["spec"].get("taints") in (None, [])
    assert {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"] == "True"
    labels = n["metadata"]["labels"]
    assert labels["beta.kubernetes.io/os"] == labels["kubernetes.io/os"] == "linux"
    assert labels["beta.kubernetes.io/arch"] == labels["kubernetes.io/arch"] == "amd64"


def test_a_joining_node_registers_not_ready_and_tainted():
    n = node_manifest(FleetSpec(nodes=4, join_gate=True), 0)
    assert "conditions" not in n["status"]
    keys = [t["key"] for t in n["spec"]["taints"]]
    assert keys == ["node.kubernetes.io/not-ready", "fleetkeeper.io/preflight"]
