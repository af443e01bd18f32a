"""The join pacer against the real local control plane: new nodes get their
labels, taints and bootstrap pod, spread at the configured rate."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NODES, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.relay.controller import add_pacer
from fleetkeeper.relay.pacing import done_annotation
from fleetkeeper.relay.settings import PacerSettings

from test_relay_e2e import until  # same directory

WAVE = "fleetkeeper.io/join-wave"


async def test_new_nodes_get_paced_join_work(kube, namespace):
    spec = FleetSpec(nodes=6, prefix="pacer-e2e", cpu_fraction=0.0)
    manifests = []
    for i in range(spec.nodes):
        m = node_manifest(spec, i)
        m["metadata"]["labels"][WAVE] = namespace[-6:]
        manifests.append(m)
    names = [m["metadata"]["name"] for m in manifests]
    cfg = PacerSettings(enabled=True, rate=2.0, burst=1, workers=4, node_selector=f"{WAVE}={namespace[-6:]}",
                        labels={"fleetkeeper.io/joined": "true"},
                        taints=[{"key": "fleetkeeper.io/bootstrap", "value": "pending", "effect": "NoSchedule"}],
                        bootstrap_pod={"namespace": namespace,
                                       "annotations": {"fleetkeeper.io/sim-result": "succeed"}})
    reg = CollectorRegistry()
    mgr = Manager(kube, RuntimeSettings(namespace=namespace, server={"port": 0}, leader_election={"enabled": False}),
                  registry=reg)
    pacer = add_pacer(mgr, cfg)
    # when each node's join work got its token, on the pacer's own clock
    granted: list[float] = []
    acquire = pacer.bucket.acquire

    async def counted_acquire():
        await acquire()
        granted.append(pacer.clock.monotonic())
    pacer.bucket.acquire = counted_acquire
    task = asyncio.create_task(mgr.run())
    try:
        await until(lambda: pacer.nodes.synced, what="pacer synced")
        await asyncio.gather(*(kube.create(NODES, m) for m in manifests))
        await until(lambda: all(n in pacer.done for n in names), timeout=120, what="join work of 6 nodes")
        # burst 1 at 2 nodes/s: the six grants span at least 2.5 s, however fast or slow the machine
        assert len(granted) >= 6
        assert granted[5] - granted[0] >= 2.5 - 1e-6, granted
        for n in names:
            node = await kube.get(NODES, n)
            meta = node["metadata"]
            assert meta["labels"]["fleetkeeper.io/joined"] == "true"
            assert done_annotation(mgr.names) in meta["annotations"]
            assert {"key": "fleetkeeper.io/bootstrap", "value": "pending", "effect": "NoSchedule"} in \
                [{k: t[k] for k in ("key", "value", "effect")} for t in node["spec"]["taints"]]
            pod = await kube.get(PODS, f"join-{n}", namespace)
            assert pod["spec"]["nodeName"] == n
            assert pod["metadata"]["ownerReferences"][0]["uid"] == meta["uid"]
        assert reg.get_sample_value("fleetkeeper_relay_join_work_total", {"result": "done"}) == 6
        assert reg.get_sample_value("fleetkeeper_relay_join_writes_total", {"kind": "node_patch"}) == 6
        # through the core applier: one successful node write each (a status update in between is a Conflict,
        # decided again from the cache)
        assert reg.get_sample_value("fleetkeeper_node_writes_total",
                                    {"component": "relay", "action": "join", "result": "success"}) == 6
        # a node that is done is left alone: no second patch after a relabel
        await kube.patch(NODES, names[0], {"metadata": {"labels": {"fleetkeeper.io/joined": "changed"}}})
        await asyncio.sleep(1.0)
        assert reg.get_sample_value("fleetkeeper_relay_join_writes_total", {"kind": "node_patch"}) == 6
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for n in names:
            try:
                await kube.delete(NODES, n)
            except errors.NotFound:
                pass
