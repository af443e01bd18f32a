"""Kubernetes Events (events.k8s.io/v1), the user-visible record of every action.

The recorder aggregates repeats of the same (object, reason, note) into one
Event with a growing series count, and bounds its own write rate with a token
bucket so a storm of identical events cannot load the API server.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
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


@dataclass
class EventRecorder:
    kube: Kube
    controller: str
    namespace: str = "default"  # unused for cluster-scoped objects: their Events must live in "default"
    clock: Clock = field(default_factory=RealClock)
    metrics: RuntimeMetrics | None = None
    rate: float = 20.0  # events per second
    burst: int = 100
    dry_run: bool = False

    def __post_init__(self) -> None:
        self._bucket = TokenBucket(self.rate, self.burst, self.clock)
        self._series: dict[tuple, tuple[str, int]] = {}
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.emitted: list[tuple[str, str, str, str]] = []  # (object, type, reason, note), last 1000

    async def emit(self, obj: ObjectRef, reason: str, note: str, *, type_: str = "Normal",
                   action: str = "Reconcile") -> None:
        """Record an Event; never raises (an Event must not break an action)."""
        note = note[:1000]
        self.emitted.append((f"{obj.kind}/{obj.namespace + '/' if obj.namespace else ''}{obj.name}", type_, reason, note))
        del self.emitted[:-1000]
        if self.metrics:
            self.metrics.events_emitted.labels(reason, type_).inc()
        log.info("event %s %s on %s %s: %s", type_, reason, obj.kind, obj.name, note)
        if self.dry_run:
            return
        if not self._bucket.take():
            log.warning("event rate limit reached; dropping %s on %s", reason, obj.name)
            return
        # The API server requires Events about cluster-scoped objects (Nodes) to
        # live in "default"; Events about namespaced objects live beside them.
        ns = obj.namespace or "default"
        key = (obj.kind, obj.namespace, obj.name, reason, note)
        now = _fmt(self.clock.now())
        try:
            prev = self._series.get(key)
            if prev:
                name, count = prev
                await self.kube.patch(EVENTS, name, {"series": {"count": count + 1, "lastObservedTime": now}}, ns)
                self._series[key] = (name, count + 1)
                return
            name = f"{obj.name}.{uuid.uuid4().hex[:12]}"
            body = {
                "apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": name, "namespace": ns},
                "eventTime": now, "reportingController": f"fleetkeeper.io/{self.controller}",
                "reportingInstance": self.instance[:128], "action": action, "reason": reason,
                "regarding": obj.as_dict(), "note": note, "type": type_,
            }
            await self.kube.create(EVENTS, body, ns)
            self._series[key] = (name, 1)
            if len(self._series) > 10_000:
                self._series.pop(next(iter(self._series)))
        except errors.FleetkeeperError as exc:
            log.warning("could not record event %s on %s: %s", reason, obj.name, exc)
