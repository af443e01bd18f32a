"""The one Kubernetes client of fleetkeeper.

Three layers, so that each can be tested on its own:

* :class:`Resource` and :func:`build_request` turn a verb on a resource into a
  :class:`Request` (method, path, query, headers, body) with no I/O.
* :class:`RetryPolicy` decides, as a plain function of the error and the
  attempt, whether and when to retry.
* :class:`Kube` sends requests through ``kubernetes_asyncio`` (kubeconfig and
  in-cluster loading, TLS, token refresh, aiohttp transport), reads raw JSON
  with ``orjson`` and maps failures onto :mod:`fleetkeeper.core.errors`.

Objects travel as plain ``dict`` (the JSON the API server sent): components
project the few fields they need (see :mod:`fleetkeeper.core.informer`)
instead of building typed models for 7,500 nodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiohttp
import orjson
from multidict import CIMultiDict

from fleetkeeper.core import errors
from fleetkeeper.core.metrics import ApiMetrics
from fleetkeeper.core.resources import (  # noqa: F401 - re-exported for the client's callers
    Resource,
    NODES,
    PODS,
    NAMESPACES,
    CONFIGMAPS,
    SECRETS,
    SERVICES,
    SERVICEACCOUNTS,
    CORE_EVENTS,
    EVENTS,
    LEASES,
    DEPLOYMENTS,
    STATEFULSETS,
    DAEMONSETS,
    JOBS,
    PDBS,
    PRIORITYCLASSES,
    WORKLOADS,
    PODGROUPS,
    COSCHED_PODGROUPS,
    ENDPOINTSLICES,
    MUTATING_WEBHOOKS,
    VALIDATING_WEBHOOKS,
    CRDS,
    CLUSTERROLES,
    CLUSTERROLEBINDINGS,
    SELF_SUBJECT_ACCESS_REVIEWS,
    SUBJECT_ACCESS_REVIEWS,
)

log = logging.getLogger("fleetkeeper.kube")

PatchType = Literal["merge", "strategic", "json", "apply"]
_PATCH_CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}
FIELD_MANAGER = "fleetkeeper"


@dataclass(frozen=True)
class Request:
    verb: str  # get, list, watch, create, patch, update, delete, evict
    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = None
    resource: str = ""


def build_request(
    verb: str,
    res: Resource,
    *,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
    body: Any = None,
    patch_type: PatchType = "merge",
    label_selector: str | None = None,
    field_selector: str | None = None,
    resource_version: str | None = None,
    limit: int | None = None,
    continue_: str | None = None,
    timeout_seconds: int | None = None,
    dry_run: bool = False,
    field_manager: str = FIELD_MANAGER,
    force: bool = False,
) -> Request:
    """Build a request without any I/O."""
    if res.namespaced and verb in ("get", "create", "patch", "update", "delete", "evict") and not namespace:
        raise errors.Terminal(f"{verb} {res.plural}: a namespace is required")
    params: list[tuple[str, str]] = []
    headers: list[tuple[str, str]] = [("Accept", "application/json")]
    method = {"get": "GET", "list": "GET", "watch": "GET", "create": "POST", "patch": "PATCH",
              "update": "PUT", "delete": "DELETE", "evict": "POST"}[verb]
    if verb == "evict":
        path = PODS.path(namespace, name, "eviction")
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
            **({"deleteOptions": {"dryRun": ["All"]}} if dry_run else {}),
        }
    else:
        path = res.path(namespace, name if verb not in ("list", "watch", "create") else None, subresource)
        if verb == "create" and subresource:
            path = res.path(namespace, name, subresource)
    if label_selector:
        params.append(("labelSelector", label_selector))
    if field_selector:
        params.append(("fieldSelector", field_selector))
    if verb in ("list", "watch"):
        if resource_version is not None:
            params.append(("resourceVersion", resource_version))
        if verb == "list":
            if limit:
                params.append(("limit", str(limit)))
            if continue_:
                params.append(("continue", continue_))
        else:
            params.append(("watch", "true"))
            params.append(("allowWatchBookmarks", "true"))
            if timeout_seconds:
                params.append(("timeoutSeconds", str(timeout_seconds)))
    if verb in ("create", "patch", "update", "delete") and dry_run:
        params.append(("dryRun", "All"))
    if verb in ("create", "patch", "update"):
        params.append(("fieldManager", field_manager))
    if verb == "patch":
        headers.append(("Content-Type", _PATCH_CONTENT_TYPES[patch_type]))
        if patch_type == "apply" and force:
            params.append(("force", "true"))
    elif body is not None:
        headers.append(("Content-Type", "application/json"))
    return Request(verb, method, path, tuple(params), tuple(headers), body, res.plural)


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a failed request: a plain function of (error, attempt)."""

    attempts: int = 5
    base: float = 0.2
    cap: float = 10.0
    retry_conflict: bool = False

    def delay(self, err: BaseException, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if attempt >= self.attempts:
            return None
        if isinstance(err, errors.TooManyRequests):
            return min(self.cap, max(err.retry_after, self.base * 2**attempt))
        if isinstance(err, errors.Conflict) and not self.retry_conflict:
            return None
        if isinstance(err, (errors.ServerError, errors.ApiUnreachable)):
            return min(self.cap, self.base * 2**attempt)
        return None


NO_RETRY = RetryPolicy(attempts=0)


def _encode_body(req: Request) -> bytes | None:
    if req.body is None:
        return None
    if isinstance(req.body, bytes):
        return req.body
    return orjson.dumps(req.body)


@dataclass
class Kube:
    """Async Kubernetes client. Build it with :meth:`connect`."""

    api_client: Any  # kubernetes_asyncio.client.ApiClient
    metrics: ApiMetrics | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    request_timeout: float = 30.0
    user_agent: str = "fleetkeeper"
    impersonate_user: str | None = None
    impersonate_groups: tuple[str, ...] = ()

    @classmethod
    async def connect(
        cls,
        kubeconfig: str | None = None,
        context: str | None = None,
        *,
        metrics: ApiMetrics | None = None,
        retry: RetryPolicy | None = None,
        impersonate: str | None = None,
        impersonate_groups: list[str] | None = None,
    ) -> "Kube":
        """Connect with a kubeconfig file, or in-cluster when ``kubeconfig`` is None
        and the service-account token exists, else ``$KUBECONFIG``/~/.kube/config."""
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        try:
            if kubeconfig is None and config.incluster_config.SERVICE_TOKEN_FILENAME and _incluster():
                config.load_incluster_config(client_configuration=cfg)
            else:
                await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        except Exception as exc:  # config errors come in many types
            raise errors.ConfigError(
                "kubeconfig", [("", kubeconfig or "$KUBECONFIG", f"cannot load the Kubernetes client configuration: {exc}")]
            ) from exc
        api = client.ApiClient(configuration=cfg)
        return cls(api, metrics=metrics, retry=retry or RetryPolicy(), impersonate_user=impersonate,
                   impersonate_groups=tuple(impersonate_groups or ()))

    def as_user(self, user: str, groups: list[str] | tuple[str, ...] = ()) -> "Kube":
        """A client sharing this connection that impersonates ``user`` (needs the
        impersonate verb; used by tests and by ``explain``)."""
        return replace(self, impersonate_user=user, impersonate_groups=tuple(groups))

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    async def close(self) -> None:
        own = getattr(self.api_client, "_fleetkeeper_session", None)
        if own is not None:
            await own[0].close()
        await self.api_client.close()

    def _session(self) -> tuple[aiohttp.ClientSession, str | None, Any]:
        """The session requests go through: kubernetes_asyncio's connection pool (TLS, limits), without
        ``trust_env``. With it, aiohttp looks up ~/.netrc and the proxy variables on every request, each
        in a worker thread: two thread hand-offs and a file parse per API call (a fifth of the controller's
        CPU in a burst of quarantines at 7,500 nodes). The environment's proxy is read once instead."""
        own = getattr(self.api_client, "_fleetkeeper_session", None)
        if own is None or own[0].closed:
            pool = self.api_client.rest_client.pool_manager
            session = aiohttp.ClientSession(connector=pool.connector, connector_owner=False, trust_env=False,
                                            read_bufsize=2**21)  # as kubernetes_asyncio's (large watch events)
            proxy, proxy_auth = None, None
            try:
                from yarl import URL

                from aiohttp.helpers import get_env_proxy_for_url
                p, proxy_auth = get_env_proxy_for_url(URL(self.host))
                proxy = str(p)
            except LookupError:  # no proxy for this host in the environment
                pass
            own = (session, proxy, proxy_auth)
            self.api_client._fleetkeeper_session = own
        return own

    async def __aenter__(self) -> "Kube":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- transport -----------------------------------------------------
    async def _send(self, req: Request, *, stream: bool = False, timeout: float | None = None):
        headers = dict(req.headers)
        headers["User-Agent"] = self.user_agent
        body = _encode_body(req)
        t0 = time.perf_counter()
        code = "error"
        try:
            await self.api_client.update_params_for_auth(headers, [], ["BearerToken"])
            for k, v in self.api_client.default_headers.items():
                headers.setdefault(k, v)
            send_headers = CIMultiDict(headers)
            if self.impersonate_user:
                send_headers.add("Impersonate-User", self.impersonate_user)
                for g in self.impersonate_groups:
                    send_headers.add("Impersonate-Group", g)
            url = self.host + req.path
            session, proxy, proxy_auth = self._session()
            to = aiohttp.ClientTimeout(total=None if stream else (timeout or self.request_timeout),
                                       sock_connect=10, sock_read=timeout if stream else None)
            kwargs: dict[str, Any] = {}
            if self.api_client.rest_client.server_hostname:
                kwargs["server_hostname"] = self.api_client.rest_client.server_hostname
            if proxy:
                kwargs.update(proxy=proxy, proxy_auth=proxy_auth)
            resp = await session.request(req.method, url, params=list(req.params), headers=send_headers,
                                         data=body, timeout=to, **kwargs)
            code = str(resp.status)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise errors.ApiUnreachable(f"{req.method} {self.host}{req.path}: {exc or type(exc).__name__}", delay=1.0) from exc
        finally:
            if self.metrics is not None:
                self.metrics.observe(req.verb, req.resource, code, time.perf_counter() - t0)
        if resp.status >= 400:
            raw = await resp.read()
            resp.release()
            try:
                status_body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                status_body = {"message": raw.decode(errors="replace")[:500]}
            raise errors.api_error(resp.status, status_body)
        return resp

    async def request(self, req: Request, *, retry: RetryPolicy | None = None) -> dict:
        """Send one request, retrying as the policy says; returns the decoded JSON body."""
        policy = retry or self.retry
        attempt = 0
        while True:
            try:
                resp = await self._send(req)
                raw = await resp.read()
                resp.release()
                return orjson.loads(raw) if raw else {}
            except errors.FleetkeeperError as exc:
                delay = policy.delay(exc, attempt)
                if delay is None:
                    raise
                attempt += 1
                log.debug("retrying %s %s in %.2fs after %s", req.method, req.path, delay, exc)
                await asyncio.sleep(delay)

    # --- verbs ---------------------------------------------------------
    async def get(self, res: Resource, name: str, namespace: str | None = None) -> dict:
        return await self.request(build_request("get", res, namespace=namespace, name=name))

    async def get_or_none(self, res: Resource, name: str, namespace: str | None = None) -> dict | None:
        try:
            return await self.get(res, name, namespace)
        except errors.NotFound:
            return None

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
        resource_version: str | None = None,
    ) -> tuple[list[dict], str]:
        """List every object (paginated); returns (items, list resourceVersion)."""
        items: list[dict] = []
        cont: str | None = None
        rv = ""
        while True:
            body = await self.request(build_request(
                "list", res, namespace=namespace, label_selector=label_selector, field_selector=field_selector,
                limit=page_size, continue_=cont, resource_version=resource_version if cont is None else None,
            ))
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            rv = meta.get("resourceVersion", rv)
            cont = meta.get("continue")
            if not cont:
                return items, rv

    async def list_pages(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[tuple[list[dict], str | None]]:
        """Yield pages of raw items; the last page carries the list resourceVersion."""
        cont: str | None = None
        while True:
            body = await self.request(build_request(
                "list", res, namespace=namespace, label_selector=label_selector, field_selector=field_selector,
                limit=page_size, continue_=cont,
            ))
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            yield body.get("items") or [], (None if cont else meta.get("resourceVersion"))
            if not cont:
                return

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[tuple[str, dict]]:
        """Yield (type, object) watch events; ERROR events raise the mapped ApiError
        (a 410 raises :class:`errors.Gone`)."""
        req = build_request("watch", res, namespace=namespace, label_selector=label_selector,
                            field_selector=field_selector, resource_version=resource_version,
                            timeout_seconds=timeout_seconds)
        resp = await self._send(req, stream=True, timeout=timeout_seconds + 30)
        try:
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1:]
                    if not line.strip():
                        continue
                    ev = orjson.loads(line)
                    if ev.get("type") == "ERROR":
                        obj = ev.get("object") or {}
                        raise errors.api_error(int(obj.get("code") or 500), obj)
                    yield ev["type"], ev["object"]
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise errors.ApiUnreachable(f"watch {res.plural}: {exc or type(exc).__name__}") from exc
        finally:
            resp.release()

    async def create(self, res: Resource, body: dict, namespace: str | None = None, *, dry_run: bool = False,
                     subresource: str | None = None, name: str | None = None) -> dict:
        return await self.request(build_request("create", res, namespace=namespace, body=body, dry_run=dry_run,
                                                subresource=subresource, name=name))

    async def patch(self, res: Resource, name: str, body: Any, namespace: str | None = None, *,
                    patch_type: PatchType = "merge", dry_run: bool = False, subresource: str | None = None,
                    force: bool = False, field_manager: str = FIELD_MANAGER) -> dict:
        return await self.request(build_request("patch", res, namespace=namespace, name=name, body=body,
                                                patch_type=patch_type, dry_run=dry_run, subresource=subresource,
                                                force=force, field_manager=field_manager))

    async def apply(self, res: Resource, body: dict, *, field_manager: str = FIELD_MANAGER, dry_run: bool = False) -> dict:
        """Server-side apply of a whole object (create or update)."""
        meta = body["metadata"]
        return await self.patch(res, meta["name"], body, meta.get("namespace"), patch_type="apply", force=True,
                                field_manager=field_manager, dry_run=dry_run)

    async def replace(self, res: Resource, name: str, body: dict, namespace: str | None = None, *,
                      subresource: str | None = None) -> dict:
        return await self.request(build_request("update", res, namespace=namespace, name=name, body=body,
                                                subresource=subresource))

    async def delete(self, res: Resource, name: str, namespace: str | None = None, *, dry_run: bool = False,
                     grace_period: int | None = None, preconditions: dict | None = None) -> dict:
        body: dict[str, Any] = {}
        if grace_period is not None:
            body["gracePeriodSeconds"] = grace_period
        if preconditions:
            body["preconditions"] = preconditions
        if body and dry_run:
            # the API server reads DeleteOptions from the body when there is one and then ignores the
            # query's dryRun: a dry-run delete with a body must say so in the body
            body["dryRun"] = ["All"]
        return await self.request(build_request("delete", res, namespace=namespace, name=name,
                                                body=body or None, dry_run=dry_run))

    async def evict(self, namespace: str, name: str, *, dry_run: bool = False) -> dict:
        """Evict a pod through the Eviction API (honours PodDisruptionBudgets: a PDB
        that forbids it answers 429, raised as :class:`errors.TooManyRequests`)."""
        return await self.request(build_request("evict", PODS, namespace=namespace, name=name, dry_run=dry_run),
                                  retry=NO_RETRY)


def _incluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )
