"""Who may read which node's view.

In production every agent presents its ServiceAccount token (a projected,
pod-bound token). The relay asks the API server who that is with a
TokenReview (cached for ``cache_ttl`` seconds by token hash, so a reconnect
storm does not become a TokenReview storm) and allows the request when

* the caller is the node itself (``system:node:<node>``), or
* the caller is one of the agent ServiceAccounts (``namespace:name``) and its
  token is bound to a pod on that node: the API server puts the node in the
  token's ``authentication.kubernetes.io/node-name`` extra (Kubernetes 1.30+,
  ServiceAccountTokenPodNodeInfo); when only the pod is named, the relay
  looks the pod up in its own cache, or
* the caller belongs to one of the ``reader_groups`` (operators, debugging).

:func:`authorize` is pure; :class:`TokenReviewAuthenticator` does the I/O.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.kube import Kube, Resource

log = logging.getLogger("fleetkeeper.relay.auth")

TOKENREVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False)
EXTRA_NODE = "authentication.kubernetes.io/node-name"
EXTRA_POD = "authentication.kubernetes.io/pod-name"
SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class AuthPolicy:
    agent_service_accounts: tuple[str, ...] = ()  # "namespace:name"
    reader_groups: tuple[str, ...] = ()
    allow_node_identity: bool = True


def authorize(ident: Identity, node: str | None, policy: AuthPolicy,
              pod_node: Callable[[str, str], str | None]) -> tuple[bool, str]:
    """May ``ident`` read ``node``'s view (``node`` None: node-independent data,
    such as the team configuration)? Returns (allowed, reason)."""
    if set(ident.groups) & set(policy.reader_groups):
        return True, f"{ident.user} is in a reader group"
    if policy.allow_node_identity and ident.user.startswith("system:node:"):
        own = ident.user.removeprefix("system:node:")
        if node is None or own == node:
            return True, f"{ident.user} is the node"
        return False, f"{ident.user} may read only node {own}, not {node}"
    if ident.user.startswith(SA_PREFIX):
        sa = ident.user.removeprefix(SA_PREFIX)
        if sa not in policy.agent_service_accounts:
            return False, f"service account {sa} is not an agent service account"
        if node is None:
            return True, f"{sa} is an agent service account"
        bound = ident.extra.get(EXTRA_NODE, ())
        if bound:
            if node in bound:
                return True, f"{sa} token is bound to a pod on {node}"
            return False, f"{sa} token is bound to a pod on {', '.join(bound)}, not on {node}"
        pods = ident.extra.get(EXTRA_POD, ())
        if pods:
            ns = sa.split(":", 1)[0]
            where = pod_node(ns, pods[0])
            if where == node:
                return True, f"{sa} token is bound to pod {ns}/{pods[0]} on {node}"
            return False, f"{sa} token is bound to pod {ns}/{pods[0]}, which is on {where or 'no known node'}"
        return False, f"{sa} token is not bound to a pod (use a projected service-account token)"
    return False, f"{ident.user} is neither a node, an agent service account nor in a reader group"


class TokenReviewAuthenticator:
    """Bearer token -> :class:`Identity` through the TokenReview API (cached)."""

    def __init__(self, kube: Kube, *, audiences: tuple[str, ...] = (), cache_ttl: float = 60.0,
                 negative_ttl: float = 5.0, max_entries: int = 20_000, clock: Clock | None = None,
                 on_review: Callable[[], None] | None = None):
        self.kube = kube
        self.audiences = audiences
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.clock = clock or RealClock()
        self.on_review = on_review
        self._cache: dict[str, tuple[float, Identity | None]] = {}

    async def authenticate(self, token: str) -> Identity | None:
        """The identity behind ``token``, or None when the API server rejects it.
        Raises :class:`errors.Temporary` when the API server cannot answer."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock.monotonic()
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1]
        spec: dict = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        if self.on_review:
            self.on_review()
        try:
            res = await self.kube.create(TOKENREVIEWS, {"apiVersion": "authentication.k8s.io/v1",
                                                        "kind": "TokenReview", "spec": spec})
        except errors.ApiError as exc:
            raise errors.Temporary(f"TokenReview failed: {exc}", delay=2) from exc
        st = res.get("status") or {}
        ident: Identity | None = None
        if st.get("authenticated"):
            u = st.get("user") or {}
            ident = Identity(u.get("username", ""), tuple(u.get("groups") or ()),
                             {k: tuple(v) for k, v in (u.get("extra") or {}).items()})
        if len(self._cache) >= self.max_entries:
            for k in [k for k, (exp, _) in self._cache.items() if exp <= now] or list(self._cache)[:1000]:
                self._cache.pop(k, None)
        self._cache[key] = (now + (self.cache_ttl if ident else self.negative_ttl), ident)
        return ident
