"""Who may see the map: a bearer token checked by TokenReview, permissions by
SubjectAccessReview, cached per token so open pages cost the API server one
review per token and minute, not one per request.

What each part of the page needs (so it shows nothing the user could not read
with kubectl):

* ``nodes`` (``get nodes``): the map (state, zone, rack, team: all on the Node);
  without it every request is 403;
* ``pods`` (``list pods`` in all namespaces): GPU use, gangs, pod search and the
  explain answers (they name pods);
* ``events`` (``list events.events.k8s.io`` in all namespaces): the timeline;
* ``config`` (``get configmaps`` in fleetkeeper's namespace): the budget and the
  team table (they read the lifecycle, health and teams ConfigMaps).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock
from fleetkeeper.core.kube import SUBJECT_ACCESS_REVIEWS, Kube, Resource

TOKEN_REVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False)
ALL = frozenset({"nodes", "pods", "events", "config"})


def capability_checks(namespace: str) -> dict[str, dict]:
    """The SubjectAccessReview resourceAttributes of each capability."""
    return {
        "nodes": {"verb": "get", "resource": "nodes"},
        "pods": {"verb": "list", "resource": "pods"},
        "events": {"verb": "list", "group": "events.k8s.io", "resource": "events"},
        "config": {"verb": "get", "resource": "configmaps", "namespace": namespace},
    }


@dataclass(frozen=True)
class Access:
    user: str
    caps: frozenset[str]


class Unauthenticated(errors.FleetkeeperError):
    pass


class TokenAuth:
    def __init__(self, kube: Kube, namespace: str, clock: Clock, ttl: float = 60.0, max_tokens: int = 10_000):
        self.kube, self.namespace, self.clock, self.ttl, self.max_tokens = kube, namespace, clock, ttl, max_tokens
        self._cache: dict[str, tuple[float, Access | None]] = {}
        self._inflight: dict[str, asyncio.Future] = {}

    async def access(self, token: str) -> Access | None:
        """The token's access (None: not authenticated), from the cache when fresh."""
        now = self.clock.now()
        hit = self._cache.get(token)
        if hit and hit[0] > now:
            return hit[1]
        fut = self._inflight.get(token)
        if fut is not None:  # many requests of one page share one review
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[token] = fut
        try:
            acc = await self._review(token)
            if len(self._cache) >= self.max_tokens:
                self._cache.pop(next(iter(self._cache)))
            self._cache[token] = (now + self.ttl, acc)
            fut.set_result(acc)
            return acc
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._inflight.pop(token, None)

    async def _review(self, token: str) -> Access | None:
        tr = await self.kube.create(TOKEN_REVIEWS, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                                    "spec": {"token": token}})
        st = tr.get("status") or {}
        if not st.get("authenticated"):
            return None
        user = st.get("user") or {}
        checks = capability_checks(self.namespace)

        async def allowed(attrs: dict) -> bool:
            body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                    "spec": {"user": user.get("username", ""), "groups": user.get("groups") or [],
                             "uid": user.get("uid", ""), "extra": user.get("extra") or {},
                             "resourceAttributes": attrs}}
            res = await self.kube.create(SUBJECT_ACCESS_REVIEWS, body)
            return bool((res.get("status") or {}).get("allowed"))

        results = await asyncio.gather(*(allowed(a) for a in checks.values()))
        return Access(user.get("username", ""), frozenset(c for c, ok in zip(checks, results) if ok))
