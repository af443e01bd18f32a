"""Who a workload and its pods belong to, whatever controller created them.

The teams webhook stamps every workload it admits on CREATE with the
annotation ``<domain>/requester`` (:class:`Stamp`: the authenticated user and
their teams, JSON). The stamp cannot be forged: the webhook overwrites what the
author wrote on CREATE, restores it on UPDATE, and the validating webhook
refuses any difference. An object created by a controller (a JobSet's Jobs,
an MPIJob's pods) inherits the stamp of its top-level owner, found by
following ``ownerReferences`` (controller: true) through an
:class:`OwnerIndex`: one small projection per workload (uid, stamp, owner uid),
kept by informers, so resolving a pod's team costs no API call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import Kube, Resource

log = logging.getLogger("fleetkeeper.attribution")

MAX_CHAIN = 10


@dataclass(frozen=True)
class Stamp:
    user: str
    teams: tuple[str, ...]

    def encode(self) -> str:
        return orjson.dumps({"teams": list(self.teams), "user": self.user}).decode()

    @classmethod
    def decode(cls, text: str | None) -> "Stamp | None":
        if not text:
            return None
        try:
            d = orjson.loads(text)
            teams = d.get("teams") or []
            if not isinstance(d.get("user"), str) or not all(isinstance(t, str) for t in teams):
                return None
            return cls(d["user"], tuple(teams))
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return None


def controller_ref(meta: dict | None) -> dict | None:
    for ref in (meta or {}).get("ownerReferences") or ():
        if isinstance(ref, dict) and ref.get("controller") and ref.get("uid"):
            return ref
    return None


@dataclass(frozen=True)
class OwnerEntry:
    uid: str
    kind: str
    namespace: str
    name: str
    stamp: Stamp | None
    owner_uid: str  # the controller owner's uid, "" if top level


def owner_projector(names: Names, kind: str) -> Callable[[dict], OwnerEntry]:
    def project(raw: dict) -> OwnerEntry:
        meta = raw.get("metadata") or {}
        ref = controller_ref(meta)
        return OwnerEntry(meta.get("uid", ""), kind, meta.get("namespace", ""), meta.get("name", ""),
                          Stamp.decode((meta.get("annotations") or {}).get(names.requester)),
                          (ref or {}).get("uid", ""))
    return project


def resolve(owner_uid: str, lookup: Callable[[str], OwnerEntry | None]) -> tuple[Stamp | None, list[OwnerEntry]]:
    """Follow controller owners from ``owner_uid`` up; the first stamp found wins
    (every level the webhook admitted carries one; levels created by exempt
    built-in controllers, such as a Deployment's ReplicaSets, may not).
    Returns the stamp (None if the chain has none or leaves the cache) and the
    chain walked, nearest first."""
    chain: list[OwnerEntry] = []
    uid = owner_uid
    while uid and len(chain) < MAX_CHAIN:
        e = lookup(uid)
        if e is None:
            return None, chain
        chain.append(e)
        if e.stamp is not None:
            return e.stamp, chain
        uid = e.owner_uid
    return None, chain


class OwnerIndex:
    """uid -> :class:`OwnerEntry` for every object of the given workload
    resources. A resource the API server does not serve (a CRD not installed)
    is probed again every ``probe_s`` seconds and watched once it appears;
    it never blocks the others."""

    def __init__(self, kube: Kube, names: Names, resources: list[Resource], *, probe_s: float = 30.0):
        self.kube, self.names, self.resources, self.probe_s = kube, names, resources, probe_s
        self._by_uid: dict[str, OwnerEntry] = {}
        self.informers: dict[str, Informer] = {}
        self.changed = asyncio.Event()

    def get(self, uid: str) -> OwnerEntry | None:
        return self._by_uid.get(uid)

    def __len__(self) -> int:
        return len(self._by_uid)

    def _on(self, typ: str, key: str, old: OwnerEntry | None, new: OwnerEntry | None) -> None:
        if old is not None and (new is None or new.uid != old.uid):
            self._by_uid.pop(old.uid, None)
        if new is not None and new.uid:
            self._by_uid[new.uid] = new
        self.changed.set()

    async def _served(self, res: Resource) -> bool:
        try:
            async for _ in self.kube.list_pages(res, page_size=1):
                break
            return True
        except errors.NotFound:
            return False

    async def _run_one(self, res: Resource) -> None:
        while True:
            try:
                if await self._served(res):
                    break
            except errors.FleetkeeperError as exc:
                log.debug("probing %s: %s", res.plural, exc)
            await asyncio.sleep(self.probe_s)
        inf = Informer(self.kube, res, owner_projector(self.names, res.kind))
        inf.add_handler(self._on)
        self.informers[f"{res.group}/{res.plural}"] = inf
        log.info("owner index: watching %s.%s", res.plural, res.group or "core")
        await inf.run()

    async def run(self) -> None:
        await asyncio.gather(*(self._run_one(r) for r in self.resources))

    async def wait_for(self, uid: str, timeout: float) -> OwnerEntry | None:
        """The entry for ``uid``, waiting up to ``timeout`` seconds for the cache to
        see an object created a moment ago (no API call)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            e = self._by_uid.get(uid)
            if e is not None or loop.time() >= deadline:
                return e
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                pass
