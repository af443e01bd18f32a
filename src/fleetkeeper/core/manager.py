"""The controller manager: one Kube client, one metrics registry, one clock,
shared informers (one per resource and selector), leader election, the ops
server, and the components' runnables.

A component provides ``setup(mgr: Manager, options) -> None`` and calls
:meth:`Manager.node_informer`, :meth:`Manager.pod_informer`,
:meth:`Manager.informer`, :meth:`Manager.recorder` and :meth:`Manager.add`.
Runnables added with ``leader=True`` (the default: anything that writes)
start only while this process holds the lease, and the process exits if the
lease is lost, so a restarted process re-reads everything (level-based).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.events import EventRecorder, flush_all
from fleetkeeper.core.informer import Index, Informer
from fleetkeeper.core import errors
from fleetkeeper.core.kube import NAMESPACES, NODES, PODS, Kube, Resource
from fleetkeeper.core.leader import LeaderElector
from fleetkeeper.core.metrics import RuntimeMetrics
from fleetkeeper.core.server import OpsServer
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.core.views import NodeView, PodView, default_projector
from fleetkeeper.core.webhook import SharedWebhooks, WebhookAsk

log = logging.getLogger("fleetkeeper.manager")


def _pod_node(p: PodView) -> tuple[str, ...]:
    return (p.node,) if p.node else ()


@dataclass
class _Runnable:
    name: str
    fn: Callable[[], Awaitable[Any]]
    leader: bool


class Manager:
    def __init__(self, kube: Kube, settings: RuntimeSettings, *, registry: CollectorRegistry | None = None,
                 clock: Clock | None = None, identity: str | None = None):
        self.kube = kube
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = RuntimeMetrics(self.registry)
        kube.metrics = kube.metrics or self.metrics.api
        self.clock = clock or RealClock()
        self.names = Names(settings.domain)
        self.projector = default_projector(settings.domain)
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self._informers: dict[tuple, Informer] = {}
        self._ungated: set[tuple] = set()  # informers the controllers' start does not wait for
        self._runnables: list[_Runnable] = []
        self._shared: dict[str, Any] = {}
        self.server = OpsServer(self.registry, settings.server.host, settings.server.port)
        wh = settings.webhook
        self.webhooks = SharedWebhooks(self.registry, host=wh.host, port=wh.port, cert_dir=wh.cert_dir)
        self.elector: LeaderElector | None = None

    # --- building blocks for components --------------------------------
    def informer(self, resource: Resource, project: Callable[[dict], Any], *, namespace: str | None = None,
                 label_selector: str | None = None, field_selector: str | None = None, key: str = "",
                 gate: bool = True) -> Informer:
        """A shared informer; two calls with the same arguments get the same one; one with another
        projection of the same resource and selectors follows the first (:meth:`Informer.follow`). ``gate=False``: the
        controllers' start does not wait for it to sync (a read-only consumer's, such as the fleet map's;
        it still counts for /readyz)."""
        k = (resource, namespace, label_selector, field_selector, key or getattr(project, "__qualname__", ""))
        if not gate and k not in self._informers:
            self._ungated.add(k)
        elif gate:
            self._ungated.discard(k)
        if k not in self._informers:
            inf = Informer(self.kube, resource, project, namespace=namespace, label_selector=label_selector,
                           field_selector=field_selector, metrics=self.metrics, clock=self.clock)
            # another projection of a stream already listed and watched here: fed by that informer
            # (one LIST, one watch and one decode per resource and selector, whatever the projections)
            lead = next((i for i in self._informers.values()
                         if i.lead is None and i.stream == inf.stream and not i.started), None)
            if lead is not None:
                inf.follow(lead)
            self._informers[k] = inf
            self.server.add_ready_check(f"informer:{resource.plural}", lambda i=inf: i.synced)
        return self._informers[k]

    def node_informer(self) -> Informer[NodeView]:
        return self.informer(NODES, self.projector.node, key="nodeview")

    def pod_informer(self) -> Informer[PodView]:
        return self.informer(PODS, self.projector.pod, key="podview")

    def pods_by_node(self) -> Index[PodView]:
        """Every cached pod bound to a node, by node name: one index shared by every component."""
        return self.pod_informer().index("node", _pod_node)

    def shared(self, name: str, factory: Callable[[], Any]) -> Any:
        """One object per name per manager, shared by the components that ask (the disruption budget's
        ledger, the machine provider): components never import each other, so they meet here."""
        if name not in self._shared:
            self._shared[name] = factory()
        return self._shared[name]

    def webhook(self, ask: WebhookAsk, handlers: dict) -> SharedWebhooks:
        """Serve ``handlers`` (path -> admission handler) on the process's one webhook server (one port, one
        certificate); call from ``setup``. The server starts with the manager, on every replica; wait for
        ``.started`` before registering a webhook configuration with its ``ca_bundle`` and ``url``."""
        if not self.webhooks:
            self.add("webhooks", self.webhooks.run, leader=False)
            self.server.add_ready_check("webhooks", self.webhooks.started.is_set)
        self.webhooks.register(ask, handlers)
        return self.webhooks

    def recorder(self, controller: str) -> EventRecorder:
        return EventRecorder(self.kube, controller, namespace=self.settings.namespace, clock=self.clock,
                             metrics=self.metrics, dry_run=self.settings.dry_run)

    async def flush_events(self, timeout: float = 10.0) -> bool:
        """Wait until the Events emitted so far (by every recorder of this process) are written."""
        return await flush_all(timeout)

    def add(self, name: str, fn: Callable[[], Awaitable[Any]], *, leader: bool = True) -> None:
        self._runnables.append(_Runnable(name, fn, leader))

    async def wait_synced(self, timeout: float = 120, *, gated_only: bool = False) -> None:
        await asyncio.gather(*(i.wait_synced(timeout) for k, i in self._informers.items()
                               if not (gated_only and k in self._ungated)))

    sync_report_interval: float = 60.0

    async def _wait_synced_patiently(self, *, gated_only: bool = False) -> None:
        """The first LIST of a large cluster on a busy API server can take
        minutes (7,500 nodes and 20,000 pods on two loaded cores: over 120 s).
        Waiting is not failing: the informers keep retrying, /readyz stays
        503, and every ``sync_report_interval`` the informers still listing
        are named in the log."""
        waited = 0.0
        while True:
            try:
                await self.wait_synced(self.sync_report_interval, gated_only=gated_only)
                return
            except TimeoutError:
                waited += self.sync_report_interval
                pending = sorted(i.resource.plural for k, i in self._informers.items()
                                 if not i.synced and not (gated_only and k in self._ungated))
                log.warning("informers not synced after %.0fs, still waiting: %s", waited, ", ".join(pending))

    # --- running --------------------------------------------------------
    async def ensure_namespace(self) -> None:
        """fleetkeeper's own namespace (Lease, ConfigMaps) must exist; create it if
        it does not (deploy manifests normally do)."""
        ns = self.settings.namespace
        if await self.kube.get_or_none(NAMESPACES, ns) is not None:
            return
        try:
            await self.kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            log.info("created namespace %s", ns)
        except errors.Conflict:
            pass

    async def run(self) -> None:
        if not self.settings.dry_run:
            await self.ensure_namespace()
        await self.server.start()
        log.info("ops server on http://%s:%d (metrics, healthz, readyz)", self.server.host, self.server.port)
        tasks: list[asyncio.Task] = []
        try:
            for inf in self._informers.values():
                tasks.append(asyncio.create_task(inf.run(), name=f"informer:{inf.resource.plural}"))
            for r in self._runnables:
                if not r.leader:
                    tasks.append(asyncio.create_task(r.fn(), name=r.name))
            le = self.settings.leader_election
            if le.enabled and not self.settings.dry_run:
                self.elector = LeaderElector(self.kube, le.lease_name, self.settings.namespace, self.identity,
                                             le.lease_duration, le.renew_period, self.clock, self.metrics)
                elect = asyncio.create_task(self.elector.run(), name="leader-election")
                tasks.append(elect)
                await self.elector.is_leader.wait()
            if any(r.leader for r in self._runnables):
                await self._wait_synced_patiently(gated_only=True)
            for r in self._runnables:
                if r.leader:
                    tasks.append(asyncio.create_task(r.fn(), name=r.name))
            log.info("running %d controllers as %s", len(self._runnables), self.identity)
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception():
                        raise t.exception()  # type: ignore[misc]
                if self.elector and self.elector.lost.is_set():
                    log.error("leadership lost; exiting so a restart re-reads the cluster")
                    return
                # a runnable that returned normally (one-shot set-up work) is simply done
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not await self.flush_events(5.0):
                log.warning("some Events were not written before stopping")
            if self.elector:
                await self.elector.release()
            await self.server.stop()
