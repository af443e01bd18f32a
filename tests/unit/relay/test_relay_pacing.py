"""Join pacing: the pure plan, selectors, and the token-bucket pace (FakeClock)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import NodeView, Taint
from fleetkeeper.relay.pacing import JoinPacer, bootstrap_pod_name, decide, done_annotation, parse_selector
from fleetkeeper.relay.settings import PacerSettings

NAMES = Names()


def node(name="n1", labels=None, annotations=None, taints=(), deleting=False, rv="7") -> NodeView:
    return NodeView(name=name, uid=f"uid-{name}", resource_version=rv, labels=labels or {"type": "kwok"},
                    annotations=annotations or {}, taints=tuple(taints), unschedulable=False, conditions=(),
                    gpus=8, cpu_millis=96000, created=0.0, deleting=deleting)


CFG = PacerSettings(enabled=True, rate=2, burst=1, workers=4, node_selector="type=kwok",
                    labels={"fleetkeeper.io/joined": "true"},
                    taints=[{"key": "fleetkeeper.io/preflight", "value": "pending"}],
                    bootstrap_pod={"namespace": "boot", "annotations": {"fleetkeeper.io/sim-result": "succeed"}})


def test_plan_for_a_new_node():
    existing = Taint("other", "x", "NoExecute")
    plan = decide(node(taints=[existing]), CFG, parse_selector(CFG.node_selector), NAMES, "fk", 1_800_000_000)
    assert plan is not None
    assert plan.patch == {
        "metadata": {"resourceVersion": "7", "annotations": {done_annotation(NAMES): "2027-01-15T08:00:00Z"},
                     "labels": {"fleetkeeper.io/joined": "true"}},
        "spec": {"taints": [{"key": "other", "value": "x", "effect": "NoExecute"},
                            {"key": "fleetkeeper.io/preflight", "value": "pending", "effect": "NoSchedule"}]},
    }
    pod = plan.pod
    assert pod["metadata"]["namespace"] == "boot" and pod["metadata"]["name"] == "join-n1"
    assert pod["spec"]["nodeName"] == "n1" and pod["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "uid-n1"}]
    assert pod["metadata"]["annotations"] == {"fleetkeeper.io/sim-result": "succeed"}


@pytest.mark.parametrize("n,why", [
    (node(annotations={"fleetkeeper.io/join-work-done": "x"}), "done"),
    (node(deleting=True), "deleting"),
    (node(labels={"type": "real"}), "not selected"),
])
def test_no_plan(n, why):
    assert decide(n, CFG, parse_selector(CFG.node_selector), NAMES, "fk", 0) is None, why


def test_taint_already_present_is_not_duplicated():
    t = Taint("fleetkeeper.io/preflight", "pending", "NoSchedule")
    plan = decide(node(taints=[t]), CFG, parse_selector(""), NAMES, "fk", 0)
    assert "spec" not in plan.patch


@pytest.mark.parametrize("text,labels,match", [
    ("", {}, True),
    ("type=kwok", {"type": "kwok"}, True),
    ("type==kwok", {"type": "x"}, False),
    ("type!=kwok", {}, True),
    ("fleetkeeper.io/pool", {"fleetkeeper.io/pool": "gpu"}, True),
    ("!fleetkeeper.io/pool", {"fleetkeeper.io/pool": "gpu"}, False),
    ("a=1, b", {"a": "1"}, False),
])
def test_selectors(text, labels, match):
    assert parse_selector(text).matches(labels) is match


@pytest.mark.parametrize("bad", ["a in (x,y)", "!a=b", "a=b=c"])
def test_bad_selectors(bad):
    with pytest.raises(ValueError, match="cannot parse"):
        parse_selector(bad)


def test_long_node_names_give_valid_pod_names():
    name = bootstrap_pod_name("join-", "n" * 300)
    assert len(name) <= 253 and name.startswith("join-n")


class FakeInformer:
    def __init__(self, nodes):
        self.nodes = {n.name: n for n in nodes}
        self.handlers = []

    def add_handler(self, h):
        self.handlers.append(h)

    def get(self, k):
        return self.nodes.get(k)

    async def wait_synced(self):
        return None

    def feed(self):
        for n in self.nodes.values():
            for h in self.handlers:
                h("ADDED", n.name, None, n)


class FakeKube:
    def __init__(self, clock, fail_conflict_once=()):
        self.clock = clock
        self.writes: list[tuple[float, str, str]] = []
        self.conflicts = set(fail_conflict_once)
        self.patches: list[dict] = []

    async def create(self, res, body, namespace=None, **kw):
        self.writes.append((self.clock.monotonic(), "create", body["metadata"]["name"]))
        return body

    async def get(self, res, name, namespace=None):
        self.writes.append((self.clock.monotonic(), "get", name))
        return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "8",
                             "labels": {"type": "kwok"}},
                "spec": {"taints": [{"key": "other", "value": "x", "effect": "NoExecute",
                                     "timeAdded": "2026-01-01T00:00:00Z"}]}}

    async def patch(self, res, name, body, namespace=None, **kw):
        self.patches.append(body)
        if name in self.conflicts:
            self.conflicts.discard(name)
            raise errors.Conflict(409, "Conflict", "the object has been modified")
        self.writes.append((self.clock.monotonic(), "patch", name))
        return body


async def test_pacer_spreads_work_at_the_configured_rate():
    clock = FakeClock()
    inf = FakeInformer([node(f"n{i}") for i in range(6)])
    kube = FakeKube(clock)
    pacer = JoinPacer(kube, inf, CFG, NAMES, "fk", clock=clock)
    inf.feed()
    assert len(pacer.pending) == 6
    task = asyncio.create_task(pacer.run())
    try:
        for _ in range(40):
            await clock.advance(0.25)
        patches = [t for t, kind, _ in kube.writes if kind == "patch"]
        assert len(patches) == 6 and not pacer.pending
        # burst 1 at 2 nodes/s: the 6th node's work starts ~2.5 s after the first
        assert patches[-1] - patches[0] == pytest.approx(2.5, abs=0.3)
        assert all(b - a >= 0.49 for a, b in zip(patches, patches[1:]))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unpaced_does_everything_at_once_and_conflicts_retry_from_the_cache():
    clock = FakeClock()
    cfg = CFG.model_copy(update={"rate": 0.0})
    kept = Taint("other", "x", "NoExecute", "2026-01-01T00:00:00Z")
    inf = FakeInformer([node(f"n{i}", taints=[kept]) for i in range(5)])
    kube = FakeKube(clock, fail_conflict_once={"n3"})
    reg = CollectorRegistry()
    pacer = JoinPacer(kube, inf, cfg, NAMES, "fk", clock=clock, registry=reg)
    inf.feed()
    task = asyncio.create_task(pacer.run())
    try:
        for _ in range(20):
            await clock.advance(0.1)
        patched = sorted(n for _, kind, n in kube.writes if kind == "patch")
        assert patched == [f"n{i}" for i in range(5)]
        # the conflict was decided again from the cache: no GET, and the bootstrap pod was not created twice
        assert sum(1 for _, kind, n in kube.writes if kind == "create" and n == "join-n3") == 1
        assert not any(kind == "get" for _, kind, _ in kube.writes)
        # one patch per node through the core applier: the cached resourceVersion, kept taints keep timeAdded
        p = kube.patches[0]
        assert p["metadata"]["resourceVersion"] == "7"
        assert p["spec"]["taints"][0]["timeAdded"] == "2026-01-01T00:00:00Z"
        assert [t["key"] for t in p["spec"]["taints"]] == ["other", "fleetkeeper.io/preflight"]
        w = "fleetkeeper_node_writes_total"
        assert reg.get_sample_value(w, {"component": "relay", "action": "join", "result": "success"}) == 5
        assert reg.get_sample_value(w, {"component": "relay", "action": "join", "result": "conflict"}) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_dry_run_writes_nothing():
    clock = FakeClock()
    inf = FakeInformer([node("n1")])
    kube = FakeKube(clock)
    reg = CollectorRegistry()
    pacer = JoinPacer(kube, inf, CFG, NAMES, "fk", clock=clock, dry_run=True, registry=reg)
    inf.feed()
    task = asyncio.create_task(pacer.run())
    try:
        await clock.advance(1)
        assert kube.writes == [] and not pacer.pending and "n1" in pacer.done
        # the applier was asked and wrote nothing
        assert reg.get_sample_value("fleetkeeper_node_writes_total",
                                    {"component": "relay", "action": "join", "result": "dry_run"}) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_bad_selector_is_a_config_error():
    with pytest.raises(errors.ConfigError, match="node_selector"):
        JoinPacer(FakeKube(FakeClock()), FakeInformer([]), CFG.model_copy(update={"node_selector": "a in (b)"}),
                  NAMES, "fk")


def test_selector_on_a_label_node_views_drop_is_refused():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from fleetkeeper.core.manager import Manager
    from fleetkeeper.core.settings import RuntimeSettings
    from fleetkeeper.relay.controller import add_pacer

    mgr = Manager(SimpleNamespace(metrics=None), RuntimeSettings(leader_election={"enabled": False}),
                  registry=CollectorRegistry())
    with pytest.raises(errors.ConfigError, match="not kept in node views"):
        add_pacer(mgr, CFG.model_copy(update={"node_selector": "join-wave=a"}))
    pacer = add_pacer(mgr, CFG.model_copy(update={"node_selector": "fleetkeeper.io/join-wave=a"}))
    assert pacer.selector.matches({"fleetkeeper.io/join-wave": "a"})
