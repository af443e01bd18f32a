"""Kubernetes Events (events.k8s.io/v1), the user-visible record of every action.

Events are written off the write path, as client-go's EventBroadcaster does:

* :meth:`EventRecorder.emit` never waits for the API server. It hands the
  occurrence to a bounded sink and returns; a few writer tasks write the sink
  out in the background. A controller's worker goes straight on to its next
  node, so an Event never delays another node's taint.
* **Node writes first.** Writers wait while the process has node writes in
  flight (:class:`WritePriority`, marked by the applier), until at most
  ``max_defer`` seconds after the occurrence, so a burst's taints are not
  queued behind its Events at the API server or on the event loop, and a
  steady stream of node writes delays Events, never starves them.
* **Aggregation** (:class:`EventCorrelator`, pure, no I/O): an occurrence
  identical to one already waiting (object, type, reason, note) is counted
  into it; one identical to an Event written within ``window`` seconds
  becomes that Event's ``series`` (count, lastObservedTime), not a new
  Event. After ``max_similar`` distinct notes of the same (object, type,
  reason) within the window, further ones are combined into one Event
  "(combined from similar events): ..." with a series count, like
  client-go's EventAggregator.
* **Bounded, never silent.** The sink holds at most ``max_pending`` distinct
  Events; beyond that an occurrence is dropped and counted in
  ``fleetkeeper_events_dropped_total{reason,cause}`` (cause ``queue_full``),
  as is one the API server refused (cause ``error``; ``namespace_terminating``,
  not logged, for an Event about an object whose namespace is being deleted). A token bucket paces
  the writes (``rate``/``burst``): a burst waits in the sink, it is not
  dropped. :meth:`EventRecorder.flush` waits until the sink is written out
  (a command about to exit, a manager shutting down, tests).
* **Announced once, across restarts.** An Event written off the write path
  is lost if the process dies between the action and the write. An
  occurrence with an ``id`` (a terminate, identified by the request
  recorded on the node) gets a name derived from it, and the controller
  announces it again each time it finds the request on the node: the first
  announcement the API server sees creates the Event, later ones meet
  AlreadyExists and are counted as ``existing``; the recorder remembers
  (bounded) which names exist, so a live process asks the API server once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.kube import EVENTS, Kube
from fleetkeeper.core.leader import _fmt
from fleetkeeper.core.metrics import RuntimeMetrics
from fleetkeeper.core.ratelimit import TokenBucket

log = logging.getLogger("fleetkeeper.events")


@dataclass(frozen=True)
class ObjectRef:
    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    api_version: str = "v1"

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "name": self.name, "apiVersion": self.api_version}
        if self.namespace:
            d["namespace"] = self.namespace
        if self.uid:
            d["uid"] = self.uid
        return d


def node_ref(name: str, uid: str = "") -> ObjectRef:
    return ObjectRef("Node", name, uid=uid)


Key = tuple[str, str, str, str, str, str, str]  # kind, namespace, name, type, reason, note, id
COMBINED = "(combined from similar events): "


def event_key(obj: ObjectRef, type_: str, reason: str, note: str, id: str = "") -> Key:
    return (obj.kind, obj.namespace, obj.name, type_, reason, note, id)


def event_name(obj: ObjectRef, id: str) -> str:
    """The name of the Event of occurrence ``id`` about ``obj`` (the same Node: its uid is part of it)."""
    digest = hashlib.sha256(f"{obj.kind}/{obj.namespace}/{obj.name}/{obj.uid}/{id}".encode()).hexdigest()[:16]
    return f"{obj.name[:200]}.{digest}"


@dataclass
class Pending:
    """One Event waiting in the sink, with the occurrences counted into it."""

    key: Key
    obj: ObjectRef
    type_: str
    reason: str
    note: str
    action: str
    count: int
    first: float  # wall-clock time of the first occurrence
    last: float  # and of the last
    id: str = ""  # the occurrence's identity (announced again after a restart): the Event's name derives from it


@dataclass
class Written:
    name: str
    count: int
    at: float  # when its last occurrence was observed


class EventCorrelator:
    """What each occurrence becomes (pure: no I/O, time is an input).

    :meth:`observe` returns ``"queued"`` (a new entry in the sink), ``"aggregated"`` (counted into an
    entry already waiting) or ``"dropped"`` (the sink is full). :meth:`pop` hands the oldest entry to a
    writer, :meth:`series_of` says whether it continues an Event already written (within ``window``),
    :meth:`written` records what the writer wrote."""

    def __init__(self, *, window: float = 600.0, max_similar: int = 10, max_pending: int = 4096,
                 max_series: int = 10_000):
        self.window = window
        self.max_similar = max_similar
        self.max_pending = max_pending
        self.max_series = max_series
        self.pending: OrderedDict[Key, Pending] = OrderedDict()
        self.series: OrderedDict[Key, Written] = OrderedDict()
        self._similar: dict[tuple[str, str, str, str, str], dict[str, float]] = {}  # -> note: last seen

    def _combine(self, obj: ObjectRef, type_: str, reason: str, note: str, now: float) -> str:
        """The note to record: ``note``, or the combined one once the (object, type, reason) had
        ``max_similar`` other notes within the window."""
        skey = (obj.kind, obj.namespace, obj.name, type_, reason)
        notes = self._similar.get(skey)
        if notes is None:
            notes = self._similar[skey] = {}
            if len(self._similar) > self.max_series:  # bounded: forget the oldest object's notes
                self._similar.pop(next(iter(self._similar)))
        for n, t in list(notes.items()):
            if now - t > self.window:
                del notes[n]
        if note in notes or len(notes) < self.max_similar:
            notes[note] = now
            return note
        return COMBINED + reason

    def observe(self, obj: ObjectRef, type_: str, reason: str, note: str, action: str, now: float,
                id: str = "") -> str:
        if not id:  # an identified occurrence keeps its note (it is one Event, never combined)
            note = self._combine(obj, type_, reason, note, now)
        key = event_key(obj, type_, reason, note, id)
        p = self.pending.get(key)
        if p is not None:
            p.count += 1
            p.last = now
            return "aggregated"
        if len(self.pending) >= self.max_pending:
            return "dropped"
        self.pending[key] = Pending(key, obj, type_, reason, note, action, 1, now, now, id)
        return "queued"

    def pop(self) -> Pending | None:
        if not self.pending:
            return None
        return self.pending.popitem(last=False)[1]

    def series_of(self, key: Key, now: float) -> Written | None:
        """The Event this key continues, if one was written and observed within the window."""
        w = self.series.get(key)
        if w is None or now - w.at > self.window:
            return None
        return w

    def written(self, key: Key, name: str, count: int, now: float) -> None:
        self.series[key] = Written(name, count, now)
        self.series.move_to_end(key)
        while len(self.series) > self.max_series:
            old, _ = self.series.popitem(last=False)
            self._similar.pop(old[:5], None)

    def forget(self, key: Key) -> None:
        self.series.pop(key, None)


class WritePriority:
    """Node writes in flight in this process. Event writers wait until there are none (bounded), so a
    burst's taints reach the API server before its Events."""

    def __init__(self) -> None:
        self.inflight = 0

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def quiet(self, clock: Clock, at_most: float, poll: float = 0.05) -> None:
        end = clock.monotonic() + at_most
        while self.inflight and clock.monotonic() < end:
            await clock.sleep(poll)


NODE_WRITES = WritePriority()  # the process's node writes (every applier marks its patches here)

_RECORDERS: "weakref.WeakSet[EventRecorder]" = weakref.WeakSet()


async def flush_all(timeout: float = 10.0) -> bool:
    """Write out every recorder's sink (a manager or command about to stop); True if all were."""
    ok = True
    for r in list(_RECORDERS):
        ok = await r.flush(timeout) and ok
    return ok


def terminating_namespace(exc: Exception) -> bool:
    """The API server refused a create because the namespace is being deleted (403, NamespaceTerminating)."""
    if not isinstance(exc, errors.Forbidden):
        return False
    cause = ((exc.body.get("details") or {}).get("causes") or [{}])[0].get("reason", "")
    return cause == "NamespaceTerminating" or "because it is being terminated" in exc.message


@dataclass(eq=False)
class EventRecorder:
    kube: Kube
    controller: str
    namespace: str = "default"  # unused for cluster-scoped objects: their Events must live in "default"
    clock: Clock = field(default_factory=RealClock)
    metrics: RuntimeMetrics | None = None
    rate: float = 20.0  # Event writes per second (a burst waits in the sink)
    burst: int = 100
    dry_run: bool = False
    window: float = 600.0  # identical occurrences within it are one Event with a series count
    max_similar: int = 10  # distinct notes per (object, type, reason) before they are combined
    max_pending: int = 4096  # distinct Events waiting to be written; more are dropped (counted)
    writers: int = 4  # Event writes in flight
    max_defer: float = 5.0  # an Event waits for node writes in flight at most this long after it happened
    priority: WritePriority = field(default_factory=lambda: NODE_WRITES)

    def __post_init__(self) -> None:
        self._bucket = TokenBucket(self.rate, self.burst, self.clock)
        self.correlator = EventCorrelator(window=self.window, max_similar=self.max_similar,
                                          max_pending=self.max_pending)
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.emitted: list[tuple[str, str, str, str]] = []  # (object, type, reason, note), last 1000
        self.counts = {"queued": 0, "aggregated": 0, "dropped": 0, "created": 0, "patched": 0, "failed": 0,
                       "known": 0, "existing": 0}
        self._named: OrderedDict[str, None] = OrderedDict()  # identified Events known to exist (bounded)
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = 0
        self._last_drop_log = -1e9
        _RECORDERS.add(self)

    def set_rate(self, rate: float, burst: int) -> None:
        """Pace the Event writes at ``rate`` a second (``burst`` saved up)."""
        self.rate, self.burst = rate, burst
        self._bucket = TokenBucket(rate, burst, self.clock)

    # --- the caller's side: never waits for the API server ---------------
    async def emit(self, obj: ObjectRef, reason: str, note: str, *, type_: str = "Normal",
                   action: str = "Reconcile", id: str = "") -> None:
        """Record an Event; never raises (an Event must not break an action) and never waits for the API
        server (the sink writes it; :meth:`flush` waits for that). ``id``: the occurrence's identity, for
        one that is announced again after a restart (one Event however often)."""
        self.record(obj, reason, note, type_=type_, action=action, id=id)

    def record(self, obj: ObjectRef, reason: str, note: str, *, type_: str = "Normal",
               action: str = "Reconcile", id: str = "") -> str:
        """:meth:`emit` without the coroutine; returns what became of it (queued, aggregated, dropped, or
        known: an identified Event this process already saw written)."""
        note = note[:1000]
        if id and event_name(obj, id) in self._named:
            self.counts["known"] += 1
            return "known"
        self._seen(obj, type_, reason, note)
        if self.dry_run:
            return "dry_run"
        what = self.correlator.observe(obj, type_, reason, note, action, self.clock.now(), id)
        self.counts[what] += 1
        if what == "dropped":
            self._dropped(reason, "queue_full", 1)
            return what
        self._start()
        return what

    async def announce(self, obj: ObjectRef, reason: str, note: str, *, type_: str = "Normal",
                       action: str = "Reconcile", id: str, timeout: float = 10.0) -> bool:
        """Write an identified Event now, before the action it announces (an eviction), so that a kill
        between the two cannot leave the action without its Event; True once it exists (written now, by an
        earlier process: AlreadyExists, or known to this one) or in a dry run. False if it could not be
        written within ``timeout``: the caller leaves the action for a later pass. Never raises."""
        note = note[:1000]
        name = event_name(obj, id)
        if name in self._named:
            self.counts["known"] += 1
            return True
        self._seen(obj, type_, reason, note)
        if self.dry_run:
            return True
        now = self.clock.now()
        p = Pending(event_key(obj, type_, reason, note, id), obj, type_, reason, note, action, 1, now, now, id)
        self._busy += 1
        try:
            return await asyncio.wait_for(self._write_named(p, obj.namespace or "default"), timeout)
        except asyncio.TimeoutError:
            self.counts["failed"] += 1
            log.warning("event %s on %s not written within %.0fs", reason, obj.name, timeout)
            self._dropped(reason, "error", 1, quiet=True)
            return False
        finally:
            self._busy -= 1

    def _seen(self, obj: ObjectRef, type_: str, reason: str, note: str) -> None:
        """An Event asked for: kept in ``emitted`` (the last 1000), counted and logged."""
        self.emitted.append((f"{obj.kind}/{obj.namespace + '/' if obj.namespace else ''}{obj.name}", type_, reason, note))
        del self.emitted[:-1000]
        if self.metrics:
            self.metrics.events_emitted.labels(reason, type_).inc()
        log.info("event %s %s on %s %s: %s", type_, reason, obj.kind, obj.name, note)

    def _dropped(self, reason: str, cause: str, n: int, quiet: bool = False) -> None:
        if self.metrics:
            self.metrics.events_dropped.labels(reason, cause).inc(n)
        if quiet:
            return
        mono = self.clock.monotonic()
        if mono - self._last_drop_log >= 10.0:  # logged, at most every 10 s; always counted
            self._last_drop_log = mono
            log.warning("event %s not recorded (%s); %d dropped so far by %s", reason, cause,
                        self.counts["dropped"] + self.counts["failed"], self.controller)

    # --- the sink's side ------------------------------------------------------
    def _start(self) -> None:
        """Writers run only while there is something to write (at most ``writers``), then end."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._tasks = loop, []
        self._tasks = [t for t in self._tasks if not t.done()]
        want = min(self.writers, len(self.correlator.pending))
        for i in range(len(self._tasks), want):
            self._tasks.append(loop.create_task(self._writer(), name=f"events:{self.controller}:{i}"))

    @property
    def waiting(self) -> int:
        """Events not yet written (in the sink or being written)."""
        return len(self.correlator.pending) + self._busy

    async def _writer(self) -> None:
        while (p := self.correlator.pop()) is not None:
            self._busy += 1
            try:
                # node writes first, but no Event later than max_defer after it happened (so a steady
                # stream of node writes, a team's convergence, does not starve the sink)
                await self.priority.quiet(self.clock, self.max_defer - (self.clock.now() - p.first))
                await self._bucket.acquire()
                await self._write(p)
            finally:
                self._busy -= 1

    async def _write(self, p: Pending) -> None:
        obj = p.obj
        # The API server requires Events about cluster-scoped objects (Nodes) to
        # live in "default"; Events about namespaced objects live beside them.
        ns = obj.namespace or "default"
        now = self.clock.now()
        if p.id:
            await self._write_named(p, ns)
            return
        try:
            prev = self.correlator.series_of(p.key, now)
            if prev is not None:
                count = prev.count + p.count
                try:
                    await self.kube.patch(EVENTS, prev.name, {"series": {"count": count,
                                                                         "lastObservedTime": _fmt(p.last)}}, ns)
                    self.correlator.written(p.key, prev.name, count, now)
                    self.counts["patched"] += 1
                    return
                except errors.NotFound:  # deleted meanwhile (or expired): a new Event
                    self.correlator.forget(p.key)
            name = f"{obj.name}.{uuid.uuid4().hex[:12]}"
            body = self._body(p, name, ns)
            if p.count > 1:  # the API server wants a series to count at least 2
                body["series"] = {"count": p.count, "lastObservedTime": _fmt(p.last)}
            await self.kube.create(EVENTS, body, ns)
            self.correlator.written(p.key, name, p.count, now)
            self.counts["created"] += 1
        except errors.FleetkeeperError as exc:
            self._failed(p, exc)

    def _failed(self, p: Pending, exc: errors.FleetkeeperError) -> None:
        self.counts["failed"] += p.count
        if terminating_namespace(exc):  # about an object whose namespace is going away with it: expected
            log.debug("event %s on %s not recorded: %s", p.reason, p.obj.name, exc)
            self._dropped(p.reason, "namespace_terminating", p.count, quiet=True)
            return
        log.warning("could not record event %s on %s: %s", p.reason, p.obj.name, exc)
        self._dropped(p.reason, "error", p.count)

    def _body(self, p: Pending, name: str, ns: str) -> dict:
        return {
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "eventTime": _fmt(p.first), "reportingController": f"fleetkeeper.io/{self.controller}",
            "reportingInstance": self.instance[:128], "action": p.action, "reason": p.reason,
            "regarding": p.obj.as_dict(), "note": p.note, "type": p.type_,
        }

    def _known(self, name: str) -> None:
        self._named[name] = None
        self._named.move_to_end(name)
        while len(self._named) > self.correlator.max_series:
            self._named.popitem(last=False)

    async def _write_named(self, p: Pending, ns: str) -> bool:
        """An identified occurrence: created under its derived name, once; AlreadyExists means an earlier
        announcement (maybe by a process that died since) was written. True once it exists."""
        name = event_name(p.obj, p.id)
        try:
            await self.kube.create(EVENTS, self._body(p, name, ns), ns)
            self.counts["created"] += 1
        except errors.Conflict:
            self.counts["existing"] += 1
        except errors.FleetkeeperError as exc:
            self._failed(p, exc)
            return False
        self._known(name)
        return True

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every Event emitted so far is written (or failed); True if done within ``timeout``."""
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            return not self.waiting  # its writers ran in another (finished) event loop
        loop = asyncio.get_running_loop()  # real time: this waits for I/O, whatever the injected clock says
        end = loop.time() + timeout
        while self.waiting:
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self, timeout: float = 10.0) -> bool:
        """Flush, then stop the writers (what is left unwritten is counted as dropped)."""
        ok = await self.flush(timeout)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while (p := self.correlator.pop()) is not None:
            self.counts["failed"] += p.count
            self._dropped(p.reason, "stopped", p.count)
        return ok
