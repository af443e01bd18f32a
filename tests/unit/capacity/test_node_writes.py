"""The capacity component writes nodes only through the core applier (the reservation taint), and loads
its ConfigMap through the core loader (missing: defaults; no key or invalid: an error naming it)."""

from __future__ import annotations

import copy

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import BalloonManager, load_cluster_config
from fleetkeeper.capacity.metrics import CapacityMetrics
from fleetkeeper.capacity.reserve import reserved_key
from fleetkeeper.core import errors
from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings

NAMES = Names()
W = "fleetkeeper_node_writes_total"


class FakeKube:
    metrics = None

    def __init__(self, cm=None):
        self.cm = cm
        self.patches: list[tuple[str, dict]] = []
        self.events: list[dict] = []
        self.conflict = False

    async def patch(self, res, name, body, namespace=None, **kw):
        assert res == NODES
        if self.conflict:
            raise errors.Conflict(409, "Conflict", "the object has been modified")
        self.patches.append((name, copy.deepcopy(body)))
        return body

    async def create(self, res, body, namespace=None, **kw):
        self.events.append(body)
        return body

    async def get_or_none(self, res, name, namespace=None):
        return self.cm


def raw_node(name="n1", rv="5"):
    return {"metadata": {"name": name, "uid": name, "resourceVersion": rv, "labels": {NAMES.pool: "gpu"}},
            "spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def balloons(dry_run=False):
    kube = FakeKube()
    mgr = Manager(kube, RuntimeSettings(namespace="fk", dry_run=dry_run, server={"port": 0},
                                        leader_election={"enabled": False}),
                  registry=CollectorRegistry(), clock=FakeClock())
    bm = BalloonManager(mgr, CapacityConfig(), CapacityMetrics(mgr.registry), mgr.recorder("capacity"))
    bm.nodes._apply("ADDED", raw_node())
    return kube, mgr, bm


async def test_the_reservation_taint_is_one_applier_patch_on_the_cached_node():
    kube, mgr, bm = balloons()
    assert await bm._set_taint("n1", reserved_key(NAMES), "tok", "reserved for gang ns/g") == "ok"
    [(name, body)] = kube.patches
    assert name == "n1" and body["metadata"] == {"resourceVersion": "5"}  # the cache's, no GET
    assert body["spec"]["taints"] == [{"key": "other", "effect": "NoSchedule"},
                                      {"key": reserved_key(NAMES), "value": "tok", "effect": "NoSchedule"}]
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "reserve", "result": "success"}) == 1
    assert await mgr.flush_events(10)  # Events are written off the write path
    assert [e["reason"] for e in kube.events] == ["NodeReserved"]


async def test_a_conflict_is_left_for_the_next_pass_and_counted():
    kube, mgr, bm = balloons()
    kube.conflict = True
    # nothing to remove on the cached node: already true, no write is even tried
    assert await bm._set_taint("n1", reserved_key(NAMES), None, "removed") == "ok"
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "unreserve",
                                             "result": "conflict"}) is None
    assert await bm._set_taint("n1", reserved_key(NAMES), "tok", "reserved") == "error"
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "reserve", "result": "conflict"}) == 1
    assert kube.patches == [] and await bm._set_taint("gone", reserved_key(NAMES), "tok", "x") == "error"


async def test_dry_run_writes_nothing_and_counts_it():
    kube, mgr, bm = balloons(dry_run=True)
    assert await bm._set_taint("n1", reserved_key(NAMES), "tok", "reserved") == "dry_run"
    assert await mgr.flush_events(10)
    assert kube.patches == [] and kube.events == []
    assert mgr.registry.get_sample_value(W, {"component": "capacity", "action": "reserve", "result": "dry_run"}) == 1


async def test_configmap_missing_is_the_defaults():
    cfg = await load_cluster_config(FakeKube(None), "fk")
    assert cfg == CapacityConfig()


@pytest.mark.parametrize("cm,words", [
    ({"data": {"other.yaml": "x"}}, "missing key 'config.yaml'"),
    ({"data": {"config.yaml": "balloons: {priority: 0}"}}, "balloons.priority"),
    ({"data": {"config.yaml": "balloons: ["}}, "not valid YAML"),
])
async def test_configmap_without_its_key_or_invalid_is_an_error_naming_it(cm, words):
    with pytest.raises(errors.ConfigError) as exc:
        await load_cluster_config(FakeKube(cm), "fk")
    assert words in str(exc.value) and "fk/fleetkeeper-capacity" in str(exc.value)
