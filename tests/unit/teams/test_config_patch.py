"""ConfigMap validation, node patches, registrations."""

from __future__ import annotations

import pytest

from fleetkeeper.core.errors import ConfigError
from fleetkeeper.core.views import Taint
from fleetkeeper.core.plan import node_patch
from fleetkeeper.teams.apply import change_plan
from fleetkeeper.teams.config import ConfigState, parse_configmap
from fleetkeeper.teams.controller import load_config_into, priorities_from
from fleetkeeper.teams.live import config_source
from fleetkeeper.teams.plan import Change, replaced_at_key
from fleetkeeper.teams.options import WebhookOptions
from fleetkeeper.teams.serve import registrations

from teams_helpers import N, view

GOOD = """
teams:
  - {team: team-a, nodeSelector: {example.com/pool: gpu}, count: 4}
membership:
  team-a: {groups: [team-a]}
"""


def cm(text: str, rv: str = "1") -> dict:
    return {"metadata": {"name": "fleetkeeper-teams", "namespace": "fk", "resourceVersion": rv},
            "data": {"config.yaml": text}}


def test_good_config():
    c = parse_configmap(cm(GOOD), "example.com")
    assert c.desired("team-a") == 4 and c.teams_of("alice", ["team-a"]) == ["team-a"]


@pytest.mark.parametrize("text,path,words", [
    ("teams: [{team: Team_A, count: 1}]", "teams[0].team", "RFC 1123"),
    ("teams: [{team: a, count: -1}]", "teams[0].count", "greater than or equal to 0"),
    ("teams: [{team: a, count: lots}]", "teams[0].count", "integer"),
    ("teams: [{team: a, count: 1, nodeSelector: {'bad key!': x}}]", "teams[0].nodeSelector", "invalid"),
    ("teams: [{team: a, count: 1, nodeSelector: {gpu-type: h100}}]", "teams[0].nodeSelector.gpu-type", "not visible"),
    ("teams: [{team: a, count: 1, colour: red}]", "teams[0].colour", "Extra inputs"),
    ("teams: [{team: a, count: 1}, {team: a, count: 2}]", "", "repeats teams[0]"),
    ("lowPriority: {below: x}", "lowPriority.below", "integer"),
    ("teams: [{team: a, count: 1}\n  - oops", "line", "not valid YAML"),
    ("- just a list", "", "expected a mapping"),
])
def test_bad_configs_name_path_value_and_rule(text, path, words):
    with pytest.raises(ConfigError) as ei:
        parse_configmap(cm(text), "example.com")
    msg = str(ei.value)
    assert path in msg and words in msg, msg


def test_missing_key():
    with pytest.raises(ConfigError, match="missing key 'config.yaml'"):
        parse_configmap({"metadata": {"name": "x", "namespace": "y"}, "data": {}}, "example.com")


def test_invalid_version_keeps_last_good():
    st = ConfigState()
    src = config_source(None, "fk", "fleetkeeper-teams", "example.com")  # type: ignore[arg-type]
    load_config_into(st, None, src)
    assert st.config is None and "ConfigMap not found" in st.error  # absent at start: nothing changes
    load_config_into(st, cm(GOOD, "1"), src)
    good = st.config
    assert good is not None and not st.error
    load_config_into(st, cm("teams: [{team: a, count: -1}]", "2"), src)
    assert st.config is good and "teams[0].count" in st.error and st.error_resource_version == "2"
    load_config_into(st, {"metadata": {"resourceVersion": "3"}, "data": {"other": "x"}}, src)
    assert st.config is good and "missing key 'config.yaml'" in st.error
    load_config_into(st, None, src)
    assert st.config is good and "not found" in st.error
    load_config_into(st, cm(GOOD.replace("count: 4", "count: 5"), "4"), src)
    assert st.config.desired("team-a") == 5 and not st.error


def ops_patch(v, change):
    return node_patch(v, change_plan(change, N, 1000.0, event=False).node_ops)


def test_node_patch_assign_release_move():
    v = view("n0", rv="42")
    body = ops_patch(v, Change("n0", "", "a", "assign", "why"))
    assert body == {"metadata": {"resourceVersion": "42", "labels": {N.team: "a"}},
                    "spec": {"taints": [{"key": N.team, "value": "a", "effect": "NoSchedule"}]}}
    other = Taint("example.com/quarantine", "x", "NoSchedule")
    moved = ops_patch(view("n1", team="a", taints=(other,)), Change("n1", "a", "b", "move", "why"))
    assert moved["spec"]["taints"] == [{"key": "example.com/quarantine", "value": "x", "effect": "NoSchedule"},
                                       {"key": N.team, "value": "b", "effect": "NoSchedule"}]
    assert moved["metadata"]["labels"] == {N.team: "b"}
    released = ops_patch(view("n2", team="a"), Change("n2", "a", "", "release", "why"))
    assert released == {"metadata": {"resourceVersion": "1", "labels": {N.team: None}}, "spec": {"taints": None}}
    # a replacement records when it was made (the rate limit counts from the nodes, across restarts)
    repl = ops_patch(view("n3"), Change("n3", "", "a", "replace", "why"))
    assert repl["metadata"]["annotations"] == {replaced_at_key(N): "1000"}
    # a repair rewrites two disagreeing team taints as one
    two = view("n4", team="a", taints=(Taint(N.team, "b", "NoSchedule"),))
    fixed = ops_patch(two, Change("n4", "a", "a", "repair", "why"))
    assert [t for t in fixed["spec"]["taints"] if t["key"] == N.team] == [
        {"key": N.team, "value": "a", "effect": "NoSchedule"}]


def test_registrations_exclude_system_namespaces_and_choose_policies():
    m, v = registrations(WebhookOptions(namespaceLabels={"t": "on"}), "fk-system", 8443, b"CA", "example.com")
    wm, wv = m["webhooks"][0], v["webhooks"][0]
    assert wm["clientConfig"]["url"] == "https://127.0.0.1:8443/teams-mutate"
    assert wm["failurePolicy"] == "Ignore" and wv["failurePolicy"] == "Fail"
    assert wm["reinvocationPolicy"] == "IfNeeded" and wm["timeoutSeconds"] == 2
    expr = wm["namespaceSelector"]["matchExpressions"][0]
    assert expr["operator"] == "NotIn" and {"kube-system", "fk-system"} <= set(expr["values"])
    assert wm["namespaceSelector"]["matchLabels"] == {"t": "on"}
    assert wm["rules"][0]["operations"] == ["CREATE", "UPDATE"] == wv["rules"][0]["operations"]
    covered = {(g, r) for rule in wv["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "replicationcontrollers"), ("batch", "cronjobs"), ("jobset.x-k8s.io", "jobsets"),
            ("kubeflow.org", "mpijobs"), ("kubeflow.org", "pytorchjobs"), ("leaderworkerset.x-k8s.io", "leaderworkersets"),
            ("ray.io", "rayjobs"), ("ray.io", "rayclusters")} <= covered
    assert wm["matchConditions"][0]["expression"] == (
        "!request.userInfo.groups.exists(g, g in ['system:serviceaccounts:kube-system', 'system:nodes'])")
    m2, _ = registrations(WebhookOptions(service="fk-system/teams-webhook:9443"), "fk-system", 0, b"CA", "example.com")
    assert m2["webhooks"][0]["clientConfig"]["service"] == {"namespace": "fk-system", "name": "teams-webhook",
                                                           "path": "/teams-mutate", "port": 9443}


def test_priorities_default():
    p = priorities_from([("low", -10, False), ("std", 100, True)])
    assert p.of("Pod", {}) == 100 and p.of("Pod", {"priorityClassName": "low"}) == -10
    assert p.of("Pod", {"priority": 5}) == 5
