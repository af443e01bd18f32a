"""Leader election on a coordination.k8s.io Lease.

The holder renews every ``renew_period``; a candidate takes the lease once it
has not been renewed for ``lease_duration``. Updates carry the Lease's
resourceVersion, so two candidates can never both win a race (one gets a
409 Conflict). The decision of whether a lease may be taken is a pure
function, :func:`may_acquire`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.kube import LEASES, Kube
from fleetkeeper.core.metrics import RuntimeMetrics

log = logging.getLogger("fleetkeeper.leader")


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(s: str | None) -> float | None:
    if not s:
        return None
    s = s.replace("Z", "+00:00")
    return datetime.fromisoformat(s).timestamp()


def may_acquire(spec: dict, identity: str, now: float) -> bool:
    """May ``identity`` take (or keep) a lease with this spec at ``now``?"""
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renew = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds") or 15
    return renew is None or now > renew + duration


@dataclass
class LeaderElector:
    kube: Kube
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_period: float = 5.0
    clock: Clock = RealClock()
    metrics: RuntimeMetrics | None = None

    def __post_init__(self) -> None:
        self.is_leader = asyncio.Event()
        self.lost = asyncio.Event()
        self.transitions = 0

    def _spec(self, now: float, acquire_time: str | None, transitions: int) -> dict:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "acquireTime": acquire_time or _fmt(now),
            "renewTime": _fmt(now),
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        now = self.clock.now()
        lease = await self.kube.get_or_none(LEASES, self.name, self.namespace)
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(now, None, 0)}
            try:
                await self.kube.create(LEASES, body, self.namespace)
                return True
            except errors.Conflict:
                return False
        spec = lease.get("spec") or {}
        if not may_acquire(spec, self.identity, now):
            return False
        mine = spec.get("holderIdentity") == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease["spec"] = self._spec(now, spec.get("acquireTime") if mine else None, transitions)
        try:
            await self.kube.replace(LEASES, self.name, lease, self.namespace)  # carries resourceVersion
            return True
        except errors.Conflict:
            return False

    async def release(self) -> None:
        """Give the lease up on a clean shutdown so a standby takes over at once."""
        if not self.is_leader.is_set():
            return
        try:
            lease = await self.kube.get(LEASES, self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                await self.kube.replace(LEASES, self.name, lease, self.namespace)
        except errors.FleetkeeperError as exc:
            log.warning("could not release lease %s: %s", self.name, exc)

    async def run(self) -> None:
        """Campaign until leader, then renew; sets :attr:`lost` and returns if the
        lease cannot be renewed within ``lease_duration``."""
        last_renew = None
        while True:
            try:
                ok = await self.try_acquire_or_renew()
            except errors.FleetkeeperError as exc:
                log.warning("lease %s: %s", self.name, exc)
                ok = False
            now = self.clock.monotonic()
            if ok:
                last_renew = now
                if not self.is_leader.is_set():
                    self.transitions += 1
                    log.info("became leader of %s/%s as %s", self.namespace, self.name, self.identity)
                    self.is_leader.set()
                    if self.metrics:
                        self.metrics.leader.labels(self.name).set(1)
            elif self.is_leader.is_set() and (last_renew is None or now - last_renew > self.lease_duration):
                log.error("lost leadership of %s/%s", self.namespace, self.name)
                self.is_leader.clear()
                self.lost.set()
                if self.metrics:
                    self.metrics.leader.labels(self.name).set(0)
                return
            await self.clock.sleep(self.renew_period if self.is_leader.is_set() else self.renew_period / 2)
