"""The owner index: uid -> :class:`~fleetkeeper.core.attribution.OwnerEntry` for
every object of the configured workload kinds, kept by informers (the I/O half
of :mod:`fleetkeeper.core.attribution`)."""

from __future__ import annotations

import asyncio
import logging

from fleetkeeper.core import errors
from fleetkeeper.core.attribution import MAX_CHAIN, OwnerEntry, controller_ref, owner_projector
from fleetkeeper.core.domain import Names
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import Kube, Resource

log = logging.getLogger("fleetkeeper.owners")

# owners read live (the cache had not seen them yet) kept until their informer does
LIVE_MAX = 1024


class OwnerIndex:
    """uid -> :class:`OwnerEntry` for every object of the given workload
    resources. A resource the API server does not serve (a CRD not installed)
    is probed again every ``probe_s`` seconds and watched once it appears;
    it never blocks the others."""

    def __init__(self, kube: Kube, names: Names, resources: list[Resource], *, probe_s: float = 30.0):
        self.kube, self.names, self.resources, self.probe_s = kube, names, resources, probe_s
        self._by_uid: dict[str, OwnerEntry] = {}
        self._live: dict[str, OwnerEntry] = {}  # read from the API server on a cache miss
        self.informers: dict[str, Informer] = {}
        self.changed = asyncio.Event()

    def get(self, uid: str) -> OwnerEntry | None:
        e = self._by_uid.get(uid)
        return e if e is not None else self._live.get(uid)

    def __len__(self) -> int:
        return len(self._by_uid)

    def _on(self, typ: str, key: str, old: OwnerEntry | None, new: OwnerEntry | None) -> None:
        if old is not None and (new is None or new.uid != old.uid):
            self._by_uid.pop(old.uid, None)
            self._live.pop(old.uid, None)
        if new is not None:
            self._live.pop(new.uid, None)
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

    async def ensure(self, namespace: str, ref: dict, timeout: float) -> OwnerEntry | None:
        """The entry for the owner named by ``ref`` (a controller ownerReference of an
        object in ``namespace``) and its controller chain up to the first stamp.
        The cache is waited for up to ``timeout`` seconds (an owner created a
        moment ago); a level it still has not seen is then read from the API
        server, so a loaded API server's slow watch never decides a pod's team."""
        first = await self.wait_for(ref.get("uid", ""), timeout)
        r: dict | None = ref
        for _ in range(MAX_CHAIN):
            if r is None or not r.get("uid"):
                break
            e, raw = self.get(r["uid"]), None
            if e is None:
                raw = await self._read(namespace, r)
                if raw is None:
                    break
                e = owner_projector(self.names, r.get("kind", ""))(raw)
                self._remember(e)
            if e.stamp is not None or not e.owner_uid:
                break
            if self.get(e.owner_uid) is not None:
                r = {"uid": e.owner_uid}
            elif raw is not None:
                r = controller_ref(raw.get("metadata"))
            else:
                break  # a cached level whose owner is not cached: its name is not kept, nothing to read
        return first if first is not None else self.get(ref.get("uid", ""))

    def _remember(self, e: OwnerEntry) -> None:
        if not e.uid or e.uid in self._by_uid:
            return
        while len(self._live) >= LIVE_MAX:
            self._live.pop(next(iter(self._live)))
        self._live[e.uid] = e

    async def _read(self, namespace: str, ref: dict) -> dict | None:
        api_version = ref.get("apiVersion", "")
        group = api_version.split("/", 1)[0] if "/" in api_version else ""
        res = next((x for x in self.resources if x.group == group and x.kind == ref.get("kind")), None)
        if res is None or not ref.get("name"):
            return None
        try:
            raw = await self.kube.get_or_none(res, ref["name"], namespace if res.namespaced else None)
        except errors.FleetkeeperError as exc:
            log.warning("owner %s %s/%s: not in the cache and not readable: %s",
                        ref.get("kind"), namespace, ref.get("name"), exc)
            return None
        if raw is None or (raw.get("metadata") or {}).get("uid") != ref["uid"]:
            return None  # gone, or a new object of the same name
        return raw

