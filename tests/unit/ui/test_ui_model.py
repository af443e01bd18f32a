"""The fleet map's pure parts: the lifecycle state of a node, the selectors and the
read-only cached client explain runs on, and the cell deltas pushed to pages."""

from __future__ import annotations


import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import CONFIGMAPS, NODES, PODS
from fleetkeeper.core.views import Condition, NodeView, Taint, default_projector
from fleetkeeper.health.decide import Keys
from fleetkeeper.ui.cache import CacheMiss, CachedKube, Source, field_matcher, label_matcher, slim
from fleetkeeper.ui.model import FleetModel
from fleetkeeper.ui.state import STATES, lifecycle_state

N = Names()
K = Keys(N)
READY = ("Ready", "True")


def view(conds=(READY,), taints=(), labels=None, ann=None, unschedulable=False, deleting=False) -> NodeView:
    return NodeView("n1", "u", "1", dict(labels or {}), dict(ann or {}),
                    tuple(Taint(k, v, "NoSchedule") for k, v in taints), unschedulable,
                    tuple(Condition(t, s, "", "", 0.0) for t, s in conds), 8, 0, 0.0, deleting)


@pytest.mark.parametrize("kwargs,pods,state", [
    ({}, 0, "in-service"),
    ({"conds": (("Ready", "False"),)}, 0, "joining"),
    ({"conds": (READY, ("GPUUnhealthy", "True"))}, 0, "suspect"),
    ({"taints": ((N.preflight, "pending"),), "labels": {N.preflight: "pending"}}, 0, "validating"),
    ({"taints": ((N.preflight, "pending"),), "ann": {N.validated_at: "1"}}, 0,
     "revalidating"),
    ({"taints": ((N.quarantine, "ecc"),)}, 0, "quarantined"),
    ({"taints": ((N.quarantine, "x"),), "ann": {K.action: "quarantine"}}, 3, "quarantined"),
    ({"taints": ((N.quarantine, "x"),), "ann": {K.action: "drain"}}, 2, "draining"),
    ({"taints": ((N.quarantine, "x"),), "ann": {K.action: "drain"}}, 0, "awaiting-repair"),
    ({"taints": ((N.quarantine, "x"),), "ann": {K.action: "terminate"}}, 2, "draining"),
    ({"taints": ((N.quarantine, "x"),), "ann": {K.action: "terminate"}}, 0, "retiring"),
    ({"deleting": True, "taints": ((N.quarantine, "x"),)}, 0, "terminated"),
])
def test_lifecycle_state_is_the_lifecycle_machine(kwargs, pods, state):
    from fleetkeeper.lifecycle import machine
    from fleetkeeper.lifecycle.config import LifecycleConfig

    v = view(**kwargs)
    assert state in STATES
    assert lifecycle_state(v, N, pods) == state == machine.state_of(machine.facts_of(v, N, pods), LifecycleConfig())[0]


def test_every_lifecycle_state_has_a_colour():
    from fleetkeeper.lifecycle import machine

    assert list(STATES) == list(machine.STATES) and len(set(STATES.values())) == len(STATES)


def test_label_and_field_selectors():
    m = label_matcher("a=1,b!=2,c,!d,e in (x, y),f notin (z)")
    assert m({"a": "1", "c": "", "e": "y"})
    assert not m({"a": "1", "c": "", "e": "q"})
    assert not m({"a": "1", "c": "", "e": "x", "d": ""})
    assert not m({"a": "1", "b": "2", "c": "", "e": "x"})
    assert not m({"a": "1", "c": "", "e": "x", "f": "z"})
    assert label_matcher(None)({})
    f = field_matcher("spec.nodeName=n1,status.phase!=Succeeded")
    assert f({"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    assert not f({"spec": {"nodeName": "n1"}, "status": {"phase": "Succeeded"}})
    assert not f({"spec": {"nodeName": "n2"}})
    with pytest.raises(errors.ConfigError):
        field_matcher("spec.nodeName")


def raw_node(name, zone="zone-a", rack="rack-0000", taints=(), team=None, gpus=8):
    labels = {"topology.kubernetes.io/zone": zone, N.rack: rack}
    if team:
        labels[N.team] = team
    return {"metadata": {"name": name, "resourceVersion": "1", "labels": labels,
                         "managedFields": [{"big": "x" * 100}]},
            "spec": {"taints": [{"key": k, "value": v, "effect": "NoSchedule"} for k, v in taints]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"nvidia.com/gpu": str(gpus)},
                       "images": [{"names": ["x"]}]}}


def raw_pod(ns, name, node, gpus=0, gang=None, phase="Running"):
    labels = {N.gang: gang} if gang else {}
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": "1", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": phase}}


def informer_with(res, objs, project=slim) -> Informer:
    inf = Informer(None, res, project)  # type: ignore[arg-type]
    for o in objs:
        inf._apply("ADDED", o)
    inf._synced.set()
    return inf


def test_slim_keeps_shape_and_drops_bulk():
    s = slim(raw_node("a"))
    assert "managedFields" not in s["metadata"] and "images" not in s["status"]
    assert s["status"]["conditions"] and s["spec"]["taints"] == [] and s["metadata"]["labels"]


async def test_cached_kube_reads_like_the_client_and_never_writes():
    nodes = informer_with(NODES, [raw_node("a"), raw_node("b")])
    pods = informer_with(PODS, [raw_pod("ns", "p1", "a"), raw_pod("ns", "p2", "b", phase="Succeeded"),
                                raw_pod("other", "p3", "a")])
    cms = informer_with(CONFIGMAPS, [{"metadata": {"namespace": "sys", "name": "cm", "resourceVersion": "1"}}])
    shards = informer_with(CONFIGMAPS, [{"metadata": {"namespace": "x", "name": "s", "resourceVersion": "1",
                                                      "labels": {"shard": "true", "kind": "gpu"}}}])
    kube = CachedKube({NODES: [Source(nodes)], PODS: [Source(pods)],
                       CONFIGMAPS: [Source(cms, "sys"), Source(shards, None, "shard=true")]})
    assert (await kube.get(NODES, "a"))["metadata"]["name"] == "a"
    assert await kube.get_or_none(NODES, "zzz") is None
    with pytest.raises(errors.NotFound):
        await kube.get(PODS, "p1", "other")
    items, _ = await kube.list(PODS, field_selector="spec.nodeName=a")
    assert sorted(p["metadata"]["name"] for p in items) == ["p1", "p3"]
    items, _ = await kube.list(PODS, "ns", field_selector="status.phase!=Succeeded")
    assert [p["metadata"]["name"] for p in items] == ["p1"]
    assert await kube.get_or_none(CONFIGMAPS, "cm", "sys") is not None
    with pytest.raises(CacheMiss):  # a namespace it does not keep
        await kube.get_or_none(CONFIGMAPS, "cm", "elsewhere")
    # a selector-scoped informer serves lists at least as narrow as its selector, in any namespace
    items, _ = await kube.list(CONFIGMAPS, label_selector="shard=true")
    assert [c["metadata"]["name"] for c in items] == ["s"]
    items, _ = await kube.list(CONFIGMAPS, label_selector="shard=true,kind=cpu")
    assert items == []
    with pytest.raises(CacheMiss):
        await kube.list(CONFIGMAPS, label_selector="other=true")
    with pytest.raises(CacheMiss):  # a resource it does not keep
        from fleetkeeper.core.kube import LEASES
        await kube.list(LEASES)
    with pytest.raises(CacheMiss):
        await kube.patch(NODES, "a", {})
    with pytest.raises(CacheMiss):
        await kube.create(NODES, {})


def test_model_deltas_are_coalesced_and_only_real_changes():
    m = FleetModel(N, default_projector(N.domain))
    m.on_node("ADDED", "a", None, raw_node("a", team="alpha"))
    m.on_node("ADDED", "b", None, raw_node("b", rack="rack-0001"))
    changed, gone = m.take_deltas()
    assert [c[0] for c in changed] == ["a", "b"] and gone == []
    assert changed[0] == ["a", "zone-a", "rack-0000", "in-service", "alpha", 0, 8, []]
    # a pod with GPUs in a gang; and a node update that changes nothing the map shows
    m.on_pod("ADDED", "ns/p", None, raw_pod("ns", "p", "a", gpus=4, gang="g1"))
    m.on_node("MODIFIED", "b", None, raw_node("b", rack="rack-0001"))
    changed, _ = m.take_deltas()
    assert changed == [["a", "zone-a", "rack-0000", "in-service", "alpha", 4, 8, ["ns/g1"]]]
    # quarantined twice within one interval: sent once
    m.on_node("MODIFIED", "b", None, raw_node("b", rack="rack-0001", taints=((N.quarantine, "x"),)))
    m.on_node("MODIFIED", "b", None, raw_node("b", rack="rack-0001", taints=((N.quarantine, "y"),)))
    changed, _ = m.take_deltas()
    assert [(c[0], c[3]) for c in changed] == [("b", "quarantined")]
    m.on_pod("DELETED", "ns/p", None, None)
    m.on_node("DELETED", "b", None, None)
    changed, gone = m.take_deltas()
    assert changed == [["a", "zone-a", "rack-0000", "in-service", "alpha", 0, 8, []]] and gone == ["b"]
    assert m.counts() == {("zone-a", "rack-0000", "in-service"): 1}
    assert m.take_deltas() == ([], [])
