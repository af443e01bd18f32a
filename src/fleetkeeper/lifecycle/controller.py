"""The lifecycle controller: for every node, facts -> :func:`machine.decide` ->
the core applier. It owns the deadlines and escalations (retire, replace,
drain, report) and publishes the state of every node and the budget in use.

It also keeps what the components share through the manager (they never
import each other): the disruption budget's configuration and ledger
(:func:`shared_budget`) and the machine provider (:func:`shared_provider`,
"terminate the machine", today's ``terminate(node, dry_run=)`` shape).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier, MachineProvider
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.metrics import PREFIX
from fleetkeeper.core.views import NodeView
from fleetkeeper.lifecycle import budget as bud
from fleetkeeper.lifecycle import machine
from fleetkeeper.lifecycle.config import CONFIG_KEY, CONFIGMAP, LifecycleConfig, load_lifecycle
from fleetkeeper.lifecycle.gangs import evictable

log = logging.getLogger("fleetkeeper.lifecycle")

BUDGET = "disruption-budget"
PROVIDER = "machine-provider"


class DeleteNodeProvider:
    """The default machine provider: delete the Node object (a local control plane's machine is its Node;
    elsewhere pass a real provider)."""

    name = "node-object"

    def __init__(self, kube: Kube):
        self.kube = kube

    async def terminate(self, node: str, *, dry_run: bool = False) -> str:
        try:
            await self.kube.delete(NODES, node, dry_run=dry_run)
        except errors.NotFound:
            return "node already gone"
        return "deleted the Node object" + (" (dry-run)" if dry_run else "")


def shared_budget(mgr: Manager) -> bud.SharedBudget:
    return mgr.shared(BUDGET, bud.SharedBudget)


def shared_provider(mgr: Manager, provider: MachineProvider | None = None) -> MachineProvider:
    """The manager's machine provider: the first one a component registers, else the configured one
    (``--machine-provider`` / ConfigMap ``fleetkeeper-machines``; default ``kubernetes-node``: delete the
    Node object of local-cluster nodes, refuse real machines) through the machine layer's ledger."""
    from fleetkeeper.machines.actuator import MachinesProvider, from_cluster

    def configured() -> MachineProvider:
        return MachinesProvider(lambda: from_cluster(mgr.kube, mgr.recorder("machines"), mgr.clock, mgr.registry,
                                                     mgr.settings.namespace, mgr.settings.machine_provider))
    return mgr.shared(PROVIDER, lambda: provider or configured())


class LifecycleMetrics:
    def __init__(self, registry: Any):
        self.nodes = Gauge(f"{PREFIX}_lifecycle_nodes", "Nodes by lifecycle state", ["state"], registry=registry)
        self.overdue = Gauge(f"{PREFIX}_lifecycle_overdue_nodes", "Nodes past their state's deadline", ["state"],
                             registry=registry)
        self.budget_used = Gauge(f"{PREFIX}_disruption_budget_used_nodes",
                                 "Nodes out of service (including admitted actions in flight) by budget scope",
                                 ["scope"], registry=registry)
        self.budget_limit = Gauge(f"{PREFIX}_disruption_budget_limit_nodes", "The budget of each scope",
                                  ["scope"], registry=registry)
        for s in machine.STATES:
            self.nodes.labels(s)
            self.overdue.labels(s)
        self.budget_used.labels("cluster")


@dataclass
class LifecycleOptions:
    config: LifecycleConfig | None = None  # None: the ConfigMap's, else defaults
    provider: MachineProvider | None = None
    reload_interval: float = 30.0


class Lifecycle:
    def __init__(self, mgr: Manager, cfg: LifecycleConfig, provider: MachineProvider):
        self.mgr, self.cfg = mgr, cfg
        self.names, self.clock = mgr.names, mgr.clock
        self.nodes = mgr.node_informer()
        self.pods_by_node = mgr.pods_by_node()
        self.budget = shared_budget(mgr)
        self.metrics = LifecycleMetrics(mgr.registry)
        self.applier = Applier(mgr.kube, mgr.recorder("lifecycle"), component="lifecycle", registry=mgr.registry,
                               clock=self.clock, dry_run=mgr.settings.dry_run, provider=provider)
        # the machine layer keeps a durable ledger (never acts twice), so a termination a crash interrupted
        # after its record may be asked again (machine.decide, provider_idempotent)
        from fleetkeeper.machines.actuator import MachinesProvider

        self.provider_idempotent = isinstance(provider, MachinesProvider)
        self.controller = Controller("lifecycle", self.reconcile, metrics=mgr.metrics, clock=self.clock,
                                     workers=cfg.workers)
        self.nodes.add_handler(self._on_node)

    def selected(self, n: NodeView) -> bool:
        return all(n.labels.get(k) == v for k, v in self.cfg.node_selector.items())

    def _on_node(self, typ: str, key: str, old: NodeView | None, new: NodeView | None) -> None:
        if new is not None and self.selected(new):
            self.controller.enqueue(key)

    def facts(self, node: NodeView) -> machine.Facts:
        left = sum(1 for p in self.pods_by_node.get(node.name) if evictable(p) or p.deleting)
        return machine.facts_of(node, self.names, left)

    def snapshot(self) -> bud.Snapshot:
        return bud.snapshot(self.nodes.items(), self.names, self.budget.cfg, self.selected)

    def admits(self, node: NodeView, now: float) -> bool:
        snap = self.snapshot()
        scopes = snap.scopes.get(node.name) or bud.scopes_of(node, self.names, self.budget.cfg)
        return bud.admit(node.name, scopes, snap, self.budget.ledger.view(), self.budget.cfg, now).admitted

    async def reconcile(self, key: str) -> Result | None:
        node = self.nodes.get(key)
        if node is None or not self.selected(node):
            return None
        now = self.clock.now()
        f = self.facts(node)
        idem = self.provider_idempotent
        d = machine.decide(f, self.cfg, self.names, now, budget_ok=True, provider_idempotent=idem)
        if d.escalation in ("retire", "replace") and d.state not in machine.OUT_OF_SERVICE and not f.gated:
            d = machine.decide(f, self.cfg, self.names, now, budget_ok=self.admits(node, now),
                               provider_idempotent=idem)
        if not d.plan.empty:
            # a re-asked termination is announced by the machine layer when it acts, not at every check
            await self.applier.apply(node, d.plan, announce=d.plan.action != "terminate-check")
        rq = d.plan.requeue_after
        return Result(requeue_after=min(rq, self.cfg.resync) if rq else self.cfg.resync)

    def publish(self) -> None:
        now = self.clock.now()
        counts = {s: 0 for s in machine.STATES}
        overdue = {s: 0 for s in machine.STATES}
        for n in self.nodes.items():
            if not self.selected(n):
                continue
            f = self.facts(n)
            state, _ = machine.state_of(f, self.cfg)
            counts[state] += 1
            dl = machine.deadline_of(state, self.cfg)
            if dl is not None and now >= (machine.since_of(state, f) or now) + dl:
                overdue[state] += 1
        for s in machine.STATES:
            self.metrics.nodes.labels(s).set(counts[s])
            self.metrics.overdue.labels(s).set(overdue[s])
        snap = self.snapshot()
        self.budget.ledger.settle(snap, now)
        used, _ = bud.usage(snap, self.budget.ledger.view(), self.budget.cfg, now)
        for scope, total in snap.totals.items():
            self.metrics.budget_used.labels(scope).set(used.get(scope, 0))
            lim = bud.limit_of(scope, self.budget.cfg).limit(total)
            if lim is not None:
                self.metrics.budget_limit.labels(scope).set(lim)

    async def resync_loop(self) -> None:
        await self.nodes.wait_synced()
        while True:
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - gauges must not stop the controller
                log.exception("lifecycle gauges failed")
            for k in self.nodes.keys():
                self.controller.enqueue(k)
            await self.clock.sleep(self.cfg.resync)


def config_source(mgr: Manager) -> ConfigMapKey[LifecycleConfig]:
    return ConfigMapKey(mgr.kube, mgr.settings.namespace, CONFIGMAP, CONFIG_KEY, load_lifecycle)


async def reload_loop(mgr: Manager, lc: Lifecycle, src: ConfigMapKey[LifecycleConfig], interval: float) -> None:
    while True:
        await mgr.clock.sleep(interval)
        cfg = await src.reload()
        if cfg is not None:
            log.info("lifecycle configuration reloaded")
            lc.cfg = cfg
            if cfg.budget is not None:
                lc.budget.configure(cfg.budget, pin=True)
            for k in lc.nodes.keys():
                lc.controller.enqueue(k)


async def setup(mgr: Manager, options: LifecycleOptions | None) -> None:
    opts = options or LifecycleOptions()
    src = config_source(mgr)
    cfg = opts.config or await src.load()
    lc = Lifecycle(mgr, cfg, shared_provider(mgr, opts.provider))
    if cfg.budget is not None:
        lc.budget.configure(cfg.budget, pin=True)
    mgr.lifecycle = lc  # type: ignore[attr-defined]  # for the demo and tests in the same process
    mgr.add("lifecycle", lc.controller.run)
    mgr.add("lifecycle-resync", lc.resync_loop)
    if opts.config is None:
        mgr.add("lifecycle-config-reload", lambda: reload_loop(mgr, lc, src, opts.reload_interval))
