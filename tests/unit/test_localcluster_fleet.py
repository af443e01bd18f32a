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


def test_kwoks_pod_complete_stage_leaves_pods_that_say_how_they_end_to_fleetkeepers_stage():
    import yaml

    from fleetkeeper.localcluster.cluster import SIM_RESULT_KEY, kwok_stage_docs

    complete = ("apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Stage\nmetadata: {name: pod-complete}\n"
                "spec:\n  selector:\n    matchExpressions:\n    - {key: .status.phase, operator: In, values: [Running]}\n"
                "  next: {statusTemplate: \"phase: Succeeded\\n\"}\n")
    ready = "apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Stage\nmetadata: {name: pod-ready}\nspec: {selector: {}}\n"
    out = kwok_stage_docs([complete + "---\n" + ready], "ours: 1\n")
    docs = [yaml.safe_load(d) for d in out]
    assert [d.get("metadata", {}).get("name") for d in docs] == ["pod-complete", "pod-ready", None]
    exprs = docs[0]["spec"]["selector"]["matchExpressions"]
    assert exprs[0]["key"] == ".status.phase"  # KWOK's own conditions kept
    assert exprs[-1] == {"key": SIM_RESULT_KEY, "operator": "DoesNotExist"}
    assert docs[0]["spec"]["next"]["statusTemplate"] == "phase: Succeeded\n"
    assert docs[1] == yaml.safe_load(ready) and out[-1] == "ours: 1\n"
