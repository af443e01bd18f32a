"""Fixtures for the capacity end-to-end tests (helpers in capacity_helpers)."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from prometheus_client import CollectorRegistry

from capacity_helpers import ISOLATION_TAINT, NAMES, Pool, wait_for
from e2e_helpers import until_webhook_answers
from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import Capacity, CapacityOptions, setup
from fleetkeeper.core import errors
from fleetkeeper.capacity.gangs import COSCHED_LABEL
from fleetkeeper.core.kube import MUTATING_WEBHOOKS, NODES, PODS, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.cluster import node_ready
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest


@pytest.fixture
async def pool_factory(kube):
    made: list[str] = []

    async def make(n: int, taints_by_index: dict[int, dict] | None = None) -> Pool:
        tag = secrets.token_hex(3)
        prefix = f"cap{tag}"
        pool = f"cap-{tag}"
        toleration = {"key": ISOLATION_TAINT, "operator": "Equal", "value": tag, "effect": "NoSchedule"}
        spec = FleetSpec(nodes=n, cpu_fraction=0.0, prefix=prefix)
        names = []
        for i in range(n):
            node = node_manifest(spec, i)
            node["metadata"]["labels"][NAMES.pool] = pool
            taints = [{"key": ISOLATION_TAINT, "value": tag, "effect": "NoSchedule"}]
            if taints_by_index and i in taints_by_index:
                taints.append(taints_by_index[i])
            node["spec"]["taints"] = taints
            await kube.create(NODES, node)
            made.append(node["metadata"]["name"])
            names.append(node["metadata"]["name"])

        async def ready():
            items, _ = await kube.list(NODES, label_selector=f"{NAMES.pool}={pool}")
            return sum(1 for x in items if node_ready(x)) == n
        await wait_for(ready, 60, what=f"{n} nodes of pool {pool} Ready")
        return Pool(pool, names, toleration, kube)

    yield make
    for name in made:
        try:
            await kube.delete(NODES, name)
        except errors.NotFound:
            pass


async def webhook_effective(kube: Kube, namespace: str, cfg: CapacityConfig) -> None:
    """Wait until the API server calls the gang webhook just registered: it picks up webhook configurations
    through a watch of its own, which on a loaded control plane lags more than a second, and a gang member
    created before that is admitted unchanged (no group: scheduled on its own). A server-side dry run of a
    gang member (no object is made) shows the webhook's mutation once it is called. With gangs off the
    registration is removed instead: the dry run of a gang member is admitted unchanged once the API server
    no longer calls the webhook of an earlier configuration (whose server may be gone)."""
    probe = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "webhook-probe", "labels": {NAMES.gang: "webhook-probe"}},
             "spec": {"containers": [{"name": "probe", "image": "probe"}]}}
    if not cfg.gangs.enabled:
        def unchanged(obj: dict) -> bool:
            return not obj["spec"].get("schedulingGroup") and not obj["spec"].get("schedulingGates")
        await until_webhook_answers(kube, PODS, probe, namespace, unchanged,
                                    "the gang webhook no more (gang members admitted unchanged)")
        return

    def mutated(obj: dict) -> bool:
        if cfg.in_tree:
            return (obj["spec"].get("schedulingGroup") or {}).get("podGroupName") == "webhook-probe"
        return (obj["metadata"].get("labels") or {}).get(COSCHED_LABEL) == "webhook-probe"
    await until_webhook_answers(kube, PODS, probe, namespace, mutated, "the gang webhook")


@pytest.fixture
async def run_capacity(kube, tmp_path):
    started: list[tuple[asyncio.Task, str]] = []

    async def start(cfg: CapacityConfig, namespace: str, *, webhook: bool = True) -> tuple[Capacity, CollectorRegistry]:
        registry = CollectorRegistry()
        settings = RuntimeSettings(namespace=namespace, server={"port": 0}, leader_election={"enabled": False})
        mgr = Manager(kube, settings, registry=registry)
        name = f"fk-capacity-e2e-{secrets.token_hex(3)}"
        opts = CapacityOptions(config=cfg, webhook=webhook, webhook_cert_dir=tmp_path / "wh",
                               webhook_config_name=name, unregister_on_exit=True,
                               namespace_selector={"matchLabels": {"kubernetes.io/metadata.name": namespace}})
        cap = await setup(mgr, opts)
        task = asyncio.create_task(mgr.run())
        started.append((task, name))
        if cap.webhook is not None:
            waiter = asyncio.create_task(cap.webhook.ready.wait())
            done, _ = await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
            assert waiter in done, "gang webhook did not become ready"
            await webhook_effective(kube, namespace, cfg)
        await mgr.wait_synced(60)
        return cap, registry

    async def stop_last() -> None:
        """Stop the controllers started last (as a restart would), keeping the webhook registration clean."""
        task, name = started.pop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await kube.delete(MUTATING_WEBHOOKS, name)
        except errors.NotFound:
            pass

    start.stop_last = stop_last
    yield start
    for task, name in started:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await kube.delete(MUTATING_WEBHOOKS, name)
        except errors.NotFound:
            pass


