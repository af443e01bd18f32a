import asyncio

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from fleetkeeper.core import errors
from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.config import load_model, parse_yaml
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.leader import _fmt, may_acquire
from fleetkeeper.core.metrics import RuntimeMetrics
from fleetkeeper.core.ratelimit import SlidingWindow, TokenBucket
from fleetkeeper.core.views import default_projector
from fleetkeeper.core.workqueue import WorkQueue


async def test_workqueue_dedup_and_dirty():
    q = WorkQueue(FakeClock())
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    k = await q.get()
    assert k == "a"
    q.add("a")  # while processing: marked dirty, not queued twice
    assert len(q) == 1
    q.done("a")
    assert len(q) == 2
    assert [await q.get(), await q.get()] == ["b", "a"]


async def test_workqueue_backoff_uses_clock():
    clock = FakeClock()
    q = WorkQueue(clock, base_delay=1.0)
    assert q.add_rate_limited("x") == 1.0
    assert q.add_rate_limited("x") == 2.0
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await clock.advance(1.0)
    assert await asyncio.wait_for(getter, 1) == "x"
    q.forget("x")
    assert q.failures("x") == 0


async def test_controller_retries_then_succeeds_and_counts():
    clock = FakeClock()
    reg = CollectorRegistry()
    m = RuntimeMetrics(reg)
    calls = []

    async def reconcile(key):
        calls.append(key)
        if len(calls) == 1:
            raise errors.Temporary("not yet", delay=5)
        return Result()

    c = Controller("t", reconcile, metrics=m, clock=clock)
    task = asyncio.create_task(c.run())
    c.enqueue("k")
    for _ in range(5):
        await asyncio.sleep(0)
    assert calls == ["k"]
    await clock.advance(5)
    for _ in range(5):
        await asyncio.sleep(0)
    assert calls == ["k", "k"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert reg.get_sample_value("fleetkeeper_reconcile_total", {"controller": "t", "result": "success"}) == 1
    assert reg.get_sample_value("fleetkeeper_reconcile_total", {"controller": "t", "result": "requeue"}) == 1


def test_may_acquire():
    now = 1_000_000.0
    assert may_acquire({}, "me", now)
    assert may_acquire({"holderIdentity": "me", "renewTime": _fmt(now)}, "me", now)
    held = {"holderIdentity": "other", "renewTime": _fmt(now - 5), "leaseDurationSeconds": 15}
    assert not may_acquire(held, "me", now)
    assert may_acquire(held, "me", now + 11)


async def test_token_bucket_and_window():
    clock = FakeClock()
    b = TokenBucket(2, 2, clock)
    assert b.take() and b.take() and not b.take()
    await clock.advance(0.5)
    assert b.take()
    w = SlidingWindow(10, clock)
    w.record()
    await clock.advance(5)
    w.record()
    assert w.count() == 2
    await clock.advance(6)
    assert w.count() == 1


class _Cfg(BaseModel):
    count: int = Field(ge=0)
    mode: str


def test_config_errors_name_path_value_and_rule():
    with pytest.raises(errors.ConfigError) as ei:
        load_model(_Cfg, {"count": -1}, "configmap x")
    paths = [p for p, _, _ in ei.value.problems]
    assert "count" in paths and "mode" in paths
    assert "greater than or equal to 0" in str(ei.value)
    with pytest.raises(errors.ConfigError) as ei:
        parse_yaml("a: [1,", "cm")
    assert "line" in ei.value.problems[0][0]


def test_projection_keeps_only_needed_fields():
    p = default_projector("example.com")
    node = {
        "metadata": {"name": "n", "uid": "u", "resourceVersion": "7", "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"example.com/team": "a", "other.io/x": "y", "topology.kubernetes.io/zone": "z"},
                     "annotations": {"huge": "x" * 1000}},
        "spec": {"taints": [{"key": "example.com/team", "value": "a", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "94"},
                   "conditions": [{"type": "Ready", "status": "True"}], "images": ["x"] * 50},
    }
    v = p.node(node)
    assert v.labels == {"example.com/team": "a", "topology.kubernetes.io/zone": "z"}
    assert v.annotations == {} and v.gpus == 8 and v.cpu_millis == 94000 and v.ready
    assert v.taint("example.com/team").value == "a"


def test_views_share_repeated_strings_and_equal_tolerations_and_taints():
    """Each decoded object brings its own copy of every string; views of many objects keep one copy of the
    strings that repeat (namespace, node, phase, label values, condition texts) and one tuple of equal
    tolerations or taints, with the values unchanged."""
    import orjson

    p = default_projector("example.com")
    pod = orjson.dumps({
        "metadata": {"namespace": "research", "name": "w-1", "labels": {"example.com/team": "vision"}},
        "spec": {"nodeName": "gpu-node-0001", "schedulerName": "default-scheduler",
                 "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                  "effect": "NoExecute"}]},
        "status": {"phase": "Running"},
    })
    node = orjson.dumps({
        "metadata": {"name": "gpu-node-0001", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"taints": [{"key": "example.com/pool", "value": "gpu", "effect": "NoSchedule"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "message": "kubelet is posting ready status"}]},
    })
    a, b = p.pod(orjson.loads(pod)), p.pod(orjson.loads(pod))
    assert (a.namespace, a.node, a.phase, a.labels, a.scheduler_name) == (
        "research", "gpu-node-0001", "Running", {"example.com/team": "vision"}, "default-scheduler")
    assert a.tolerations[0].key == "node.kubernetes.io/not-ready" and a.tolerations[0].operator == "Exists"
    for field in ("namespace", "node", "phase", "scheduler_name"):
        assert getattr(a, field) is getattr(b, field), field
    assert a.labels["example.com/team"] is b.labels["example.com/team"]
    assert a.tolerations is b.tolerations
    m, n = p.node(orjson.loads(node)), p.node(orjson.loads(node))
    assert m.name is a.node  # a pod's node name is its node's
    assert m.taints is n.taints and m.taint("example.com/pool").value == "gpu"
    assert m.conditions[0].message is n.conditions[0].message and m.ready
    assert m.labels["topology.kubernetes.io/zone"] is n.labels["topology.kubernetes.io/zone"]
