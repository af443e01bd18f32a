"""``setup(mgr, None)`` reads the ConfigMap; a broken one is a clear error and starts nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.relay.controller import setup


class CMKube(SimpleNamespace):
    async def get_or_none(self, res, name, namespace=None):
        self.asked = (res.plural, name, namespace)
        return self.cm


def manager(cm):
    kube = CMKube(metrics=None, cm=cm)
    return Manager(kube, RuntimeSettings(namespace="fk", leader_election={"enabled": False}),
                   registry=CollectorRegistry()), kube


async def test_defaults_without_configmap_run_the_relay_only():
    mgr, kube = manager(None)
    await setup(mgr, None)
    assert kube.asked == ("configmaps", "fleetkeeper-relay", "fk")
    assert [r.name for r in mgr._runnables] == ["relay", "relay-config-watch"]
    assert len(mgr._informers) == 3


async def test_configmap_enables_the_pacer():
    mgr, _ = manager({"data": {"config.yaml": "relay: {enabled: false}\npacer: {enabled: true, rate: 5}"}})
    await setup(mgr, None)
    assert [(r.name, r.leader) for r in mgr._runnables] == [("join-pacer", True), ("relay-config-watch", False)]


@pytest.mark.parametrize("cm,where", [
    ({"data": {"config.yaml": "pacer: {rate: fast}"}}, "pacer.rate"),
    ({"data": {"other": "x"}}, "missing key 'config.yaml'"),
])
async def test_broken_configmap_is_a_config_error_and_starts_nothing(cm, where):
    mgr, _ = manager(cm)
    with pytest.raises(errors.ConfigError, match=where) as exc:
        await setup(mgr, None)
    assert "fk/fleetkeeper-relay" in str(exc.value)
    assert mgr._runnables == [] and mgr._informers == {}
