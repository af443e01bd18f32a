"""The hub: per-node fan-out, resume from history, 410s, slow subscribers."""

from __future__ import annotations

import orjson
import pytest

from fleetkeeper.relay.hub import Gone, Hub
from fleetkeeper.relay.views import AgentProjector

PROJ = AgentProjector(("fleetkeeper.io/",))


def raw_pod(name: str, node: str, rv: str = "1", ns: str = "ns", ip: str = "10.0.0.1", phase: str = "Running",
            labels: dict | None = None, annotations: dict | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "resourceVersion": rv,
                         "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"nodeName": node} if node else {}, "status": {"podIP": ip, "phase": phase}}


def raw_node(name: str, rv: str = "1", heartbeat: str = "2026-01-01T00:00:00Z", labels: dict | None = None) -> dict:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": rv, "labels": labels or {}},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True",
                                                   "lastHeartbeatTime": heartbeat}]}}


def lines(sub) -> list[dict]:
    return [orjson.loads(x) for x in sub.drain()]


def add_pod(hub: Hub, raw: dict, old=None):
    new = PROJ.pod(raw)
    hub.on_pod("ADDED" if old is None else "MODIFIED", new.key, old, new)
    return new


def test_pod_event_reaches_only_its_node():
    hub = Hub()
    a, b = hub.subscribe("node-a", None), hub.subscribe("node-b", None)
    lines(a), lines(b)  # initial bookmarks
    add_pod(hub, raw_pod("p1", "node-a"))
    got_a, got_b = lines(a), lines(b)
    assert [(e["type"], e["kind"], e["object"]["name"]) for e in got_a] == [("ADDED", "Pod", "p1")]
    assert got_b == []
    assert hub.stats.fanned_out == 1


def test_initial_watch_lists_current_state_then_bookmark():
    hub = Hub()
    n = PROJ.node(raw_node("node-a"))
    hub.on_node("ADDED", "node-a", None, n)
    add_pod(hub, raw_pod("p2", "node-a"))
    add_pod(hub, raw_pod("p1", "node-a"))
    add_pod(hub, raw_pod("q", "node-b"))
    sub = hub.subscribe("node-a", "0")
    evs = lines(sub)
    assert [(e["type"], e.get("kind"), (e.get("object") or {}).get("name")) for e in evs] == [
        ("ADDED", "Node", "node-a"), ("ADDED", "Pod", "p1"), ("ADDED", "Pod", "p2"), ("BOOKMARK", None, None)]
    assert evs[-1]["resourceVersion"] == hub.rv()


def test_unscheduled_pod_then_binding_then_delete():
    hub = Hub()
    sub = hub.subscribe("node-a", None)
    lines(sub)
    p0 = add_pod(hub, raw_pod("p", "", ip=""))
    assert lines(sub) == [] and hub.entries.get("") is None
    p1 = add_pod(hub, raw_pod("p", "node-a", rv="2"), old=p0)
    assert [e["type"] for e in lines(sub)] == ["ADDED"]
    assert hub.pod_node("ns", "p") == "node-a"
    hub.on_pod("DELETED", p1.key, p1, None)
    evs = lines(sub)
    assert [(e["type"], e["object"]["name"]) for e in evs] == [("DELETED", "p")]
    assert hub.pod_node("ns", "p") is None
    assert hub.pod_docs("node-a") == []


def test_heartbeat_only_updates_are_suppressed():
    hub = Hub()
    sub = hub.subscribe("node-a", None)
    lines(sub)
    n1 = PROJ.node(raw_node("node-a", "1", "2026-01-01T00:00:00Z"))
    hub.on_node("ADDED", "node-a", None, n1)
    n2 = PROJ.node(raw_node("node-a", "2", "2026-01-01T00:00:40Z"))
    hub.on_node("MODIFIED", "node-a", n1, n2)
    assert [e["type"] for e in lines(sub)] == ["ADDED"]
    assert hub.stats.suppressed == 1
    n3 = PROJ.node(raw_node("node-a", "3", labels={"fleetkeeper.io/team": "a"}))
    hub.on_node("MODIFIED", "node-a", n2, n3)
    assert [e["object"]["labels"] for e in lines(sub)] == [{"fleetkeeper.io/team": "a"}]


def test_resume_replays_only_missed_events_of_the_node():
    hub = Hub()
    p1 = add_pod(hub, raw_pod("p1", "node-a"))
    rv = hub.rv()
    add_pod(hub, raw_pod("other", "node-b"))
    add_pod(hub, raw_pod("p2", "node-a"))
    hub.on_pod("DELETED", p1.key, p1, None)
    sub = hub.subscribe("node-a", rv)
    assert [(e["type"], e["object"]["name"]) for e in lines(sub)] == [("ADDED", "p2"), ("DELETED", "p1")]


@pytest.mark.parametrize("rv,why", [
    ("otherepoch-1", "another relay process"),
    ("garbage", "not a relay resourceVersion"),
    ("EPOCH-999", "ahead of the relay"),
])
def test_resume_with_foreign_rv_is_gone(rv, why):
    hub = Hub(epoch="EPOCH")
    add_pod(hub, raw_pod("p1", "node-a"))
    with pytest.raises(Gone):
        hub.subscribe("node-a", rv)
    assert hub.stats.gone == 1


def test_trimmed_history_is_gone_but_recent_resume_works():
    hub = Hub(history=3)
    add_pod(hub, raw_pod("p0", "node-a"))
    old = hub.rv()
    pods = [add_pod(hub, raw_pod(f"p{i}", "node-a")) for i in range(1, 6)]
    with pytest.raises(Gone):
        hub.subscribe("node-a", old)
    recent = hub.rv(hub.seq - 2)
    sub = hub.subscribe("node-a", recent)
    assert [e["object"]["name"] for e in lines(sub)] == [p.doc["name"] for p in pods[-2:]]


def test_forgotten_node_entry_makes_old_rvs_gone():
    hub = Hub()
    p = add_pod(hub, raw_pod("p", "node-a"))
    rv = hub.rv()
    hub.on_pod("DELETED", p.key, p, None)  # node-a has nothing left: entry forgotten
    assert "node-a" not in hub.entries
    with pytest.raises(Gone):
        hub.subscribe("node-a", rv)  # the DELETED event is no longer in any history
    sub = hub.subscribe("node-a", hub.rv())
    assert lines(sub) == []


def test_slow_subscriber_is_dropped_and_memory_freed():
    dropped = []
    hub = Hub(buffer=3, on_drop=dropped.append)
    slow = hub.subscribe("node-a", hub.rv())
    fast = hub.subscribe("node-a", hub.rv())
    for i in range(5):
        add_pod(hub, raw_pod(f"p{i}", "node-a"))
        lines(fast)
    assert slow.overflowed and not slow.buf and dropped == [slow]
    assert hub.subscriber_count("node-a") == 1 and hub.subscribers == 1
    assert hub.stats.dropped == 1


def test_team_config_goes_to_every_subscriber_and_is_replayed():
    hub = Hub()
    rv = hub.rv()
    a, b = hub.subscribe("node-a", rv), hub.subscribe("node-b", rv)
    t = PROJ.teams({"metadata": {"name": "fleetkeeper-teams", "namespace": "fk", "resourceVersion": "5"},
                    "data": {"teams.yaml": "a: {}"}})
    hub.on_teams("ADDED", "fk/fleetkeeper-teams", None, t)
    assert [e["kind"] for e in lines(a)] == ["TeamConfig"] and [e["kind"] for e in lines(b)] == ["TeamConfig"]
    late = hub.subscribe("node-c", rv)
    assert [e["object"]["data"] for e in lines(late)] == [{"teams.yaml": "a: {}"}]
    hub.on_teams("DELETED", "fk/fleetkeeper-teams", t, None)
    assert [e["type"] for e in lines(a)] == ["DELETED"]
    assert hub.teams_doc() is None


def test_unsubscribe_forgets_empty_entries():
    hub = Hub()
    sub = hub.subscribe("node-x", None)
    assert "node-x" in hub.entries
    hub.unsubscribe(sub)
    assert "node-x" not in hub.entries and hub.subscribers == 0


def test_fan_out_cost_does_not_grow_with_other_nodes_subscribers():
    hub = Hub()
    subs = [hub.subscribe(f"node-{i}", None) for i in range(2000)]
    for s in subs:
        s.drain()
    before = hub.stats.fanned_out
    add_pod(hub, raw_pod("p", "node-7"))
    assert hub.stats.fanned_out - before == 1
    assert len(subs[7].buf) == 1 and all(not s.buf for i, s in enumerate(subs) if i != 7)


def test_projection_keeps_agent_fields_only():
    raw = raw_pod("p", "node-a", labels={"fleetkeeper.io/team": "a", "app": "x"},
                  annotations={"fleetkeeper.io/egress-limit": "100mbit",
                               "kubectl.kubernetes.io/last-applied-configuration": "{...}"})
    raw["spec"]["containers"] = [{"name": "c", "image": "i", "env": [{"name": "X", "value": "y" * 1000}]}]
    doc = PROJ.pod(raw).doc
    assert doc == {"namespace": "ns", "name": "p", "uid": "uid-p", "ip": "10.0.0.1", "phase": "Running",
                   "labels": {"fleetkeeper.io/team": "a", "app": "x"},
                   "annotations": {"fleetkeeper.io/egress-limit": "100mbit"}}
    raw["spec"]["hostNetwork"] = True
    assert PROJ.pod(raw).doc["ip"] == ""


def test_view_json_is_the_view_with_the_team_config_serialised_once():
    hub = Hub()
    hub.on_node("ADDED", "node-a", None, PROJ.node(raw_node("node-a")))
    add_pod(hub, raw_pod("p1", "node-a"))
    assert orjson.loads(hub.view_json("node-a")) == hub.view("node-a")  # teams absent: null
    teams = PROJ.teams({"metadata": {"name": "fleetkeeper-teams", "namespace": "fk", "resourceVersion": "5"},
                        "data": {"config.yaml": "teams: {}"}})
    hub.on_teams("ADDED", "fk/fleetkeeper-teams", None, teams)
    before = hub.teams_json
    assert orjson.loads(hub.view_json("node-a")) == hub.view("node-a")
    assert orjson.loads(hub.view_json("node-a"))["teams"]["data"] == {"config.yaml": "teams: {}"}
    assert orjson.loads(hub.view_json("node-zz")) == hub.view("node-zz")  # unknown node: null node, no pods
    assert hub.teams_json is before  # not serialised again per view
    hub.on_teams("DELETED", "fk/fleetkeeper-teams", teams, None)
    assert orjson.loads(hub.view_json("node-a"))["teams"] is None


def test_bookmark_is_serialised_once_per_resource_version():
    hub = Hub()
    b1 = hub.bookmark()
    assert hub.bookmark() is b1
    assert orjson.loads(b1) == {"type": "BOOKMARK", "resourceVersion": hub.rv()}
    add_pod(hub, raw_pod("p1", "node-a"))
    b2 = hub.bookmark()
    assert b2 is not b1 and orjson.loads(b2)["resourceVersion"] == hub.rv()


async def test_subscriber_wait_wakes_on_push_and_times_out_without_one():
    import asyncio

    hub = Hub()
    sub = hub.subscribe("node-a", hub.rv())
    assert await sub.wait(0.01) is False  # nothing queued: the timeout passes
    assert await sub.wait(0) is False
    waiter = asyncio.ensure_future(sub.wait(30))
    await asyncio.sleep(0)
    add_pod(hub, raw_pod("p1", "node-a"))
    assert await waiter is True  # woken by the push, long before 30 s
    assert [e["object"]["name"] for e in lines(sub)] == ["p1"]
    waiter = asyncio.ensure_future(sub.wait(30))
    await asyncio.sleep(0)
    sub.wake()  # the server's stop wakes its watches
    assert await waiter is True and sub.drain() == []


def test_agent_views_share_repeated_strings_and_equal_condition_and_taint_lists():
    """Agent docs of many objects keep one copy of what repeats (label values, phases, the node's
    condition and taint lists), with the JSON agents get unchanged."""
    node = {"metadata": {"name": "gpu-node-0001", "labels": {"fleetkeeper.io/pool": "gpu-pool"}},
            "spec": {"taints": [{"key": "fleetkeeper.io/pool", "value": "gpu-pool", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"nvidia.com/gpu": "8"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}
    a, b = (PROJ.node(orjson.loads(orjson.dumps(node))) for _ in range(2))
    assert a.doc == b.doc and orjson.loads(orjson.dumps(a.doc)) == {
        "name": "gpu-node-0001", "uid": "", "labels": {"fleetkeeper.io/pool": "gpu-pool"}, "annotations": {},
        "taints": [{"key": "fleetkeeper.io/pool", "value": "gpu-pool", "effect": "NoSchedule"}],
        "unschedulable": False, "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        "gpus": "8"}
    assert a.doc["conditions"] is b.doc["conditions"] and a.doc["taints"] is b.doc["taints"]
    assert a.doc["labels"]["fleetkeeper.io/pool"] is b.doc["labels"]["fleetkeeper.io/pool"]
    pod = raw_pod("p", "gpu-node-0001", labels={"fleetkeeper.io/team": "vision"}, phase="Running")
    p, q = (PROJ.pod(orjson.loads(orjson.dumps(pod))) for _ in range(2))
    assert p.doc["phase"] is q.doc["phase"] and p.doc["namespace"] is q.doc["namespace"]
    assert p.doc["labels"]["fleetkeeper.io/team"] is q.doc["labels"]["fleetkeeper.io/team"]
    assert p.node is a.name
