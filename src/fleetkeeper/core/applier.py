"""The one applier: turns a :class:`fleetkeeper.core.plan.Plan` into API writes.

Every component writes nodes through it, so every node write has the same
guarantees:

* **one patch, optimistic concurrency from the cache**: the node operations
  fold into one merge patch (:func:`fleetkeeper.core.plan.node_patch`)
  carrying the resourceVersion the decision saw. A Conflict means the cache
  was behind: the applier raises :class:`errors.Temporary` and the work
  queue decides again on fresh state, so nothing is done twice and no GET is
  needed;
* **dry-run**: nothing is written; the Event says "would"; evictions go to
  the API server with ``dryRun=All`` so PodDisruptionBudgets are still
  checked; the machine provider is asked with ``dry_run=True``;
* **rate limits**: node writes and evictions each through a token bucket;
* **an Event per action** (the plan's own, else one named after the action),
  handed to the recorder's sink after the write: it never delays this or
  another node's write, and Event writers wait while node writes are in
  flight (:mod:`fleetkeeper.core.events`);
* ``fleetkeeper_node_writes_total{component,action,result}``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.events import NODE_WRITES, EventRecorder, node_ref
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.core.metrics import PREFIX
from fleetkeeper.core.plan import Event, Plan, node_patch
from fleetkeeper.core.ratelimit import TokenBucket
from fleetkeeper.core.views import NodeView

log = logging.getLogger("fleetkeeper.applier")

RESULTS = ("success", "conflict", "not_found", "error", "dry_run", "rate_limited", "blocked")


class MachineProvider(Protocol):
    """What the applier needs of a machine provider (terminate, and optionally reboot / replace)."""

    name: str

    async def terminate(self, node: str, *, dry_run: bool = False) -> str: ...


class NodeWriteMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.writes = Counter(f"{PREFIX}_node_writes_total",
                              "Writes to nodes (patches, evictions, machine actions) by component, action and result",
                              ["component", "action", "result"], registry=registry)


_METRICS: "weakref.WeakKeyDictionary[CollectorRegistry, NodeWriteMetrics]" = weakref.WeakKeyDictionary()


def node_write_metrics(registry: CollectorRegistry) -> NodeWriteMetrics:
    """One counter per registry, shared by every component's applier."""
    m = _METRICS.get(registry)
    if m is None:
        m = _METRICS[registry] = NodeWriteMetrics(registry)
    return m


@dataclass
class Applied:
    """What one plan did."""

    patched: bool = False
    evicted: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # PodDisruptionBudget (429) or several PDBs (500)
    failed: list[str] = field(default_factory=list)
    rate_limited: bool = False
    machine: str = ""  # the provider's answer
    gone: bool = False  # the node no longer exists

    def then(self, later: Applied) -> Applied:
        """This plan's outcome followed by a later plan's on the same node (evictions in two steps)."""
        self.evicted += later.evicted
        self.blocked += later.blocked
        self.failed += later.failed
        self.rate_limited = later.rate_limited
        return self


class Applier:
    def __init__(self, kube: Kube, recorder: EventRecorder, *, component: str,
                 registry: CollectorRegistry, clock: Clock | None = None,
                 dry_run: bool | Callable[[], bool] = False, writes_per_second: float = 50.0,
                 evictions_per_second: float = 10.0, provider: MachineProvider | None = None):
        self.kube = kube
        self.recorder = recorder
        self.priority = getattr(recorder, "priority", None) or NODE_WRITES  # the recorder's, else the process's
        self.component = component
        self.clock = clock or RealClock()
        self._dry_run = dry_run
        self.metrics = node_write_metrics(registry)
        self.write_bucket = TokenBucket(writes_per_second, max(1, int(writes_per_second)), self.clock)
        self.evict_bucket = TokenBucket(evictions_per_second, max(1, int(evictions_per_second)), self.clock)
        self.provider = provider

    def set_write_rate(self, per_second: float, burst: int) -> None:
        """A component whose configuration sets its write rate (and may reload it)."""
        if (self.write_bucket.rate, self.write_bucket.burst) != (per_second, burst):
            self.write_bucket = TokenBucket(per_second, burst, self.clock)

    @property
    def dry_run(self) -> bool:
        return self._dry_run() if callable(self._dry_run) else bool(self._dry_run)

    def count(self, action: str, result: str, n: int = 1) -> None:
        self.metrics.writes.labels(self.component, action, result).inc(n)

    async def _events(self, node: NodeView, plan: Plan, default: bool) -> None:
        events = list(plan.events)
        if not events and default:
            events = [Event("".join(w.capitalize() for w in plan.action.replace("-", "_").split("_")),
                            plan.why or plan.action)]
        for e in events:
            if self.dry_run:
                # an identified occurrence keeps its identity, apart from the real one's: one "would" Event
                await self.recorder.emit(node_ref(node.name, node.uid), f"DryRun{e.reason}", f"would: {e.note}",
                                         type_="Normal", id=f"dry-run:{e.id}" if e.id else "")
            else:
                await self.recorder.emit(node_ref(node.name, node.uid), e.reason, e.note, type_=e.type, id=e.id)

    async def apply(self, node: NodeView, plan: Plan, *, announce: bool = True) -> Applied:
        """Apply ``plan`` to ``node`` (the cached view the plan was decided on).

        Order: the node patch, then evictions, then the machine; Events last: the plan's own, else (with
        ``announce``) one named after the action. A caller that reports the outcome itself (how many pods
        were evicted) passes ``announce=False``. Raises :class:`errors.Temporary` when the cache was behind
        (Conflict) so the caller decides again."""
        out = Applied()
        dry = self.dry_run
        acted = False
        body = node_patch(node, plan.node_ops)
        if body is not None:
            if dry:
                log.info("dry-run: %s %s: would patch %s", plan.action, node.name, body)
                self.count(plan.action, "dry_run")
            else:
                await self.write_bucket.acquire()
                try:
                    with self.priority.writing():  # Event writers wait for this (events.WritePriority)
                        await self.kube.patch(NODES, node.name, body)
                except errors.Conflict:
                    self.count(plan.action, "conflict")
                    raise errors.Temporary(f"{node.name} changed since the cache saw it; deciding again",
                                           0.2) from None
                except errors.NotFound:
                    self.count(plan.action, "not_found")
                    out.gone = True
                    return out
                except errors.FleetkeeperError:
                    self.count(plan.action, "error")
                    raise
                self.count(plan.action, "success")
            out.patched = acted = True
        for ev in plan.evictions:
            if not self.evict_bucket.take():
                self.count("evict", "rate_limited")
                out.rate_limited = True
                break
            try:
                await self.kube.evict(ev.namespace, ev.name, dry_run=dry)
                out.evicted.append(ev.key)
                self.count("evict", "dry_run" if dry else "success")
            except errors.NotFound:
                pass
            except errors.TooManyRequests as exc:
                out.blocked.append(ev.key)
                self.count("evict", "blocked")
                log.info("eviction of %s from %s blocked: %s", ev.key, node.name, exc.message)
            except errors.ServerError as exc:  # e.g. more than one PDB selects the pod
                out.blocked.append(ev.key)
                self.count("evict", "blocked")
                log.warning("eviction of %s failed: %s", ev.key, exc)
            except errors.ApiError as exc:
                out.failed.append(ev.key)
                self.count("evict", "error")
                log.warning("eviction of %s failed: %s", ev.key, exc)
        acted = acted or bool(out.evicted)
        m = plan.machine
        if m is not None:
            if self.provider is None:
                raise errors.Terminal(f"{plan.action} {node.name}: no machine provider configured")
            verb = getattr(self.provider, m.how, None) if m.how != "terminate" else self.provider.terminate
            if verb is None:
                raise errors.Terminal(f"the {self.provider.name} provider cannot {m.how} machines")
            try:
                out.machine = await verb(node.name, dry_run=dry)
            except errors.FleetkeeperError as exc:
                self.count(m.how, "error")
                if out.patched and plan.events:
                    # the request is recorded on the node, so a retry will not announce it again: its
                    # Events are emitted now, with the provider's failure, not lost with the answer
                    await self._events(node, plan, default=False)
                    await self.recorder.emit(node_ref(node.name, node.uid), "MachineActionFailed",
                                             f"{m.how} failed: {exc}; it is asked again", type_="Warning")
                raise
            # a repeated ask of a request already on the node (the machine layer never acts twice) is a
            # check, not another success
            self.count(m.how, "dry_run" if dry else ("checked" if plan.action.endswith("-check") else "success"))
            acted = True
        if plan.events or (acted and announce):
            await self._events(node, plan, default=acted and announce)
        return out
