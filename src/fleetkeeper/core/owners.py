"""The owner index: uid -> :class:`~fleetkeeper.core.attribution.OwnerEntry` for
every object of the configured workload kinds, kept by informers (the I/O half
of :mod:`fleetkeeper.core.attribution`)."""

from __future__ import annotations

import asyncio
import logging

from fleetkeeper.core import errors
from fleetkeeper.core.attribution import OwnerEntry, owner_projector
from fleetkeeper.core.domain import Names
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import Kube, Resource

log = logging.getLogger("fleetkeeper.owners")


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
