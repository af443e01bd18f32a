"""Paced node joins.

When hundreds of nodes join at once (a new rack, a cluster restart), every
controller that reacts to a new node writes at once: labels, taints, a
per-node bootstrap pod, agent registrations. The API server sees a burst of
writes on top of the nodes' own registrations. :class:`JoinPacer` performs
that per-node join work for every new node at a configured rate (a token
bucket: ``rate`` nodes per second, ``burst`` saved up) and with at most
``workers`` nodes in flight, so a burst of joins becomes a steady stream.

The work for one node, in order (idempotent; a crash in between is healed by
the next pass):

1. create the bootstrap pod (bound to the node with ``nodeName``, owned by
   the Node so it goes when the node goes); AlreadyExists is success;
2. the node's part through the core applier (:mod:`fleetkeeper.core.applier`),
   like every node write of fleetkeeper: the configured labels, the configured
   taints added to the node's own and the annotation
   ``<domain>/join-work-done`` that marks the node as done, in one merge patch
   carrying the resourceVersion of the cached node (no GET). A Conflict (a
   status update in between) means the cache was behind: the node is decided
   again from the cache a moment later, without creating its pod again.

:func:`fleetkeeper.relay.joins.decide` is pure; :class:`JoinPacer` is the thin apply adapter.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier
from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.controller import Controller
from fleetkeeper.core.domain import Names
from fleetkeeper.core.events import EventRecorder, node_ref
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import PODS, Kube
from fleetkeeper.core.metrics import RuntimeMetrics
from fleetkeeper.core.ratelimit import TokenBucket
from fleetkeeper.core.views import NodeView
from fleetkeeper.relay.joins import (  # noqa: F401 - re-exported: the pure join decision
    JoinPlan,
    Selector,
    bootstrap_pod_name,
    decide,
    done_annotation,
    parse_selector,
)
from fleetkeeper.relay.metrics import PacerMetrics
from fleetkeeper.relay.settings import PacerSettings

log = logging.getLogger("fleetkeeper.relay.pacer")

CONTROLLER = "join-pacer"


class _NoEvents:
    """No recorder given (unit tests): Events go nowhere."""

    async def emit(self, *a, **kw) -> None:
        return None


# --- apply ------------------------------------------------------------------------------
class JoinPacer:
    """Performs the join work of new nodes at ``cfg.rate`` nodes per second."""

    def __init__(self, kube: Kube, nodes: Informer[NodeView], cfg: PacerSettings, names: Names, namespace: str, *,
                 recorder: EventRecorder | None = None, metrics: PacerMetrics | None = None,
                 runtime_metrics: RuntimeMetrics | None = None, clock: Clock | None = None, dry_run: bool = False,
                 registry: CollectorRegistry | None = None):
        self.kube = kube
        self.nodes = nodes
        self.cfg = cfg
        self.names = names
        self.namespace = namespace
        self.recorder = recorder
        self.metrics = metrics
        self.clock = clock or RealClock()
        self.dry_run = dry_run
        try:
            self.selector = parse_selector(cfg.node_selector)
        except ValueError as exc:
            raise errors.ConfigError("pacer", [("node_selector", cfg.node_selector, str(exc))]) from None
        # the pace is the bucket below; the applier's own write limit only stops a runaway loop
        self.applier = Applier(kube, recorder or _NoEvents(), component="relay",
                               registry=registry if registry is not None else CollectorRegistry(), clock=self.clock,
                               dry_run=dry_run, writes_per_second=max(50.0, cfg.rate * 2))
        self._pod_made: set[str] = set()  # bootstrap pods created (a retried patch does not create them again)
        self._started: set[str] = set()  # join work begun: a retry is not paced again
        self.bucket = TokenBucket(cfg.rate, cfg.burst, self.clock) if cfg.rate > 0 else None
        self.controller = Controller(CONTROLLER, self.reconcile, metrics=runtime_metrics, clock=self.clock,
                                     workers=cfg.workers)
        self.pending: set[str] = set()
        self.done: dict[str, float] = {}  # node -> seconds from first seen to done (last runs)
        self._first_seen: dict[str, float] = {}
        self._dry_done: set[str] = set()
        if metrics:
            metrics.rate.set(cfg.rate)
        nodes.add_handler(self._on_node)

    def _on_node(self, typ: str, key: str, old: NodeView | None, new: NodeView | None) -> None:
        if new is None:
            self.pending.discard(key)
            self._first_seen.pop(key, None)
            self._pod_made.discard(key)
            self._started.discard(key)
        elif key not in self._dry_done and decide(new, self.cfg, self.selector, self.names, self.namespace,
                                                  self.clock.now()) is not None:
            if key not in self.pending:
                self.pending.add(key)
                self._first_seen.setdefault(key, self.clock.monotonic())
            self.controller.enqueue(key)
        else:
            self.pending.discard(key)
        if self.metrics:
            self.metrics.pending.set(len(self.pending))

    def plan(self, name: str) -> JoinPlan | None:
        node = self.nodes.get(name)
        if node is None:
            return None
        return decide(node, self.cfg, self.selector, self.names, self.namespace, self.clock.now())

    async def reconcile(self, key: str) -> None:
        if key in self._dry_done or self.plan(key) is None:
            return
        if self.bucket is not None and key not in self._started:
            t0 = self.clock.monotonic()
            await self.bucket.acquire()
            if self.metrics:
                self.metrics.wait.observe(self.clock.monotonic() - t0)
        plan = self.plan(key)  # the node may have changed (or gone) while waiting
        if plan is None:
            return
        node = self.nodes.get(key)
        if node is None:
            return
        if self.dry_run:
            self._dry_done.add(key)
            await self.applier.apply(node, plan.plan())  # writes nothing; counts dry_run, "would" Event
            self._finish(key, "dry_run")
            return
        self._started.add(key)
        if plan.pod is not None and key not in self._pod_made:
            ns = plan.pod["metadata"]["namespace"]
            try:
                await self.kube.create(PODS, plan.pod, ns)
                if self.metrics:
                    self.metrics.writes.labels("bootstrap_pod").inc()
            except errors.Conflict:
                pass  # AlreadyExists: an earlier pass created it
            except errors.NotFound:
                if self.metrics:
                    self.metrics.joins.labels("error").inc()
                raise errors.Temporary(f"cannot create the bootstrap pod of {key}: namespace {ns} does not "
                                       f"exist", delay=30) from None
            except errors.FleetkeeperError:
                if self.metrics:
                    self.metrics.joins.labels("error").inc()
                raise
            self._pod_made.add(key)
        try:
            done = await self.applier.apply(node, plan.plan())
        except errors.Temporary:
            if self.metrics:
                self.metrics.joins.labels("conflict").inc()
            raise  # the cache was behind (Conflict): decided again from the cache, not paced again
        except errors.FleetkeeperError:
            if self.metrics:
                self.metrics.joins.labels("error").inc()
            raise
        if done.gone:
            return  # the node went away
        if done.patched and self.metrics:
            self.metrics.writes.labels("node_patch").inc()
        self._pod_made.discard(key)
        self._started.discard(key)
        self._finish(key, "done")

    def _finish(self, key: str, result: str) -> None:
        self.pending.discard(key)
        first = self._first_seen.pop(key, None)
        if first is not None:
            self.done[key] = self.clock.monotonic() - first
            if len(self.done) > 20_000:
                self.done.pop(next(iter(self.done)))
        if self.metrics:
            self.metrics.joins.labels(result).inc()
            self.metrics.pending.set(len(self.pending))

    async def run(self) -> None:
        await self.nodes.wait_synced()
        log.info("join pacer: %s, %d workers", f"{self.cfg.rate:g} nodes/s (burst {self.cfg.burst})"
                 if self.bucket else "unpaced", self.cfg.workers)
        await self.controller.run()
