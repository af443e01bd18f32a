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

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from fleetkeeper.core.domain import Names

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
