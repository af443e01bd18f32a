"""Serving and registering the toleration webhook.

:func:`registrations` (pure) builds the Mutating- and
ValidatingWebhookConfiguration; :class:`WebhookRunner` serves the handlers
over TLS and registers them by URL (local control plane) or Service.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.kube import MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS, Kube
from fleetkeeper.core.admission import Admission, AdmissionRequest
from fleetkeeper.core.webhook import WebhookServer, registration, webhook_entry

from fleetkeeper.teams.admission import DEFAULT_KINDS, TeamAdmission
from fleetkeeper.teams.workloads import WorkloadKinds
from fleetkeeper.teams.options import WebhookOptions
from fleetkeeper.core.pki import write_serving_cert

log = logging.getLogger("fleetkeeper.teams.webhook")

MUTATE, VALIDATE = "teams-mutate", "teams-validate"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
T = TypeVar("T")


class ServingThread:
    """An event loop of its own in a daemon thread. The webhook's TLS, HTTP and
    decisions run there, so a busy manager loop (an informer decoding a burst
    of watch events, a teams pass over 7,500 nodes) never sits between
    kube-apiserver and an answer; the two threads only share the GIL, which the
    interpreter hands over every few milliseconds."""

    def __init__(self, name: str = "teams-webhook"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this thread's loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self) -> None:
        """Stop the loop once the connections it served have finished closing."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return
        await self.call(_settle())
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join, 10)


async def _settle(limit_s: float = 10.0) -> None:
    """Run this loop until the sockets it still watches are closed (a stopped TLS
    server's connections finish their close_notify exchange with the client on the
    loop), up to ``limit_s``; then cancel what is left. A loop stopped earlier
    would leave those sockets to the garbage collector."""
    loop = asyncio.get_running_loop()
    selector = getattr(loop, "_selector", None)
    steps = int(limit_s / 0.02)
    for _ in range(steps):
        if selector is None or len(selector.get_map()) <= 1:  # only the loop's own wake-up socket
            break
        await asyncio.sleep(0.02)
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def thread_safe_handler(decide: Callable[[AdmissionRequest], Admission], admission: TeamAdmission,
                        home: asyncio.AbstractEventLoop) -> Callable[[AdmissionRequest], Admission | Awaitable[Admission]]:
    """``decide`` answered in the serving thread, at once when it can be: only a
    request whose owner the index has not seen yet (a controller's pod created a
    moment after its owner) waits, and that wait runs on ``home``, the manager's
    loop, where the owner index lives."""

    def serve(req: AdmissionRequest) -> Admission | Awaitable[Admission]:
        uid = admission.needs_owner(req)
        if uid is None or admission.wait_owner is None:
            return decide(req)
        wait = admission.wait_owner(uid, admission.owner_wait_s)

        async def after_wait() -> Admission:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wait, home))  # type: ignore[arg-type]
            return decide(req)
        return after_wait()
    return serve


def rules(workloads: bool, operations: list[str], pod_operations: list[str],
          kinds: WorkloadKinds = DEFAULT_KINDS) -> list[dict]:
    """Pods, and (``workloads``) every configured workload kind with a pod template."""
    out = kinds.rules(operations, pod_operations)
    return out if workloads else out[:1]


def namespace_selector(opts: WebhookOptions, own_namespace: str) -> dict:
    excluded = sorted(set(opts.exclude_namespaces) | {own_namespace, "kube-system"})
    sel: dict = {"matchExpressions": [{"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": excluded}]}
    if opts.namespace_labels:
        sel["matchLabels"] = dict(opts.namespace_labels)
    return sel


def client_target(opts: WebhookOptions, port: int, path: str) -> tuple[str | None, dict | None]:
    if opts.service:
        ns, _, rest = opts.service.partition("/")
        name, _, p = rest.partition(":")
        return None, {"namespace": ns, "name": name, "path": f"/{path}", "port": int(p or 443)}
    return f"https://{opts.url_host or opts.host}:{port}/{path}", None


def match_conditions(opts: WebhookOptions) -> list[dict]:
    """CEL conditions that keep requests of ``skip_groups`` away from the webhook
    (no round trip at all for pods the built-in controllers create)."""
    if not opts.skip_groups:
        return []
    groups = ", ".join("'" + g.replace("'", "") + "'" for g in opts.skip_groups)
    return [{"name": "not-from-skipped-groups",
             "expression": f"!request.userInfo.groups.exists(g, g in [{groups}])"}]


def registrations(opts: WebhookOptions, own_namespace: str, port: int, ca_bundle: bytes,
                  domain: str, kinds: WorkloadKinds = DEFAULT_KINDS) -> tuple[dict, dict]:
    sel = namespace_selector(opts, own_namespace)
    url, svc = client_target(opts, port, MUTATE)
    mutating = registration("mutating", opts.config_name, [webhook_entry(
        f"tolerations.teams.{domain}", url=url, service=svc, ca_bundle=ca_bundle,
        rules=rules(opts.workloads, ["CREATE", "UPDATE"], ["CREATE", "UPDATE"], kinds),
        failure_policy=opts.mutating_failure_policy, timeout_seconds=opts.timeout_seconds,
        namespace_selector=sel, reinvocation="IfNeeded")])
    url, svc = client_target(opts, port, VALIDATE)
    validating = registration("validating", opts.config_name, [webhook_entry(
        f"entitlement.teams.{domain}", url=url, service=svc, ca_bundle=ca_bundle,
        rules=rules(opts.workloads, ["CREATE", "UPDATE"], ["CREATE", "UPDATE"], kinds),
        failure_policy=opts.validating_failure_policy, timeout_seconds=opts.timeout_seconds,
        namespace_selector=sel)])
    conditions = match_conditions(opts)
    for obj in (mutating, validating):
        obj["metadata"]["labels"] = {f"{domain}/managed-by": "fleetkeeper-teams"}
        if conditions:
            for w in obj["webhooks"]:
                w["matchConditions"] = conditions
    return mutating, validating


async def unregister(kube: Kube, config_name: str) -> None:
    for res in (MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS):
        try:
            await kube.delete(res, config_name)
        except errors.NotFound:
            pass


class WebhookRunner:
    def __init__(self, kube: Kube, admission: TeamAdmission, opts: WebhookOptions, own_namespace: str,
                 domain: str, registry: CollectorRegistry):
        self.kube, self.admission, self.opts = kube, admission, opts
        self.own_namespace, self.domain = own_namespace, domain
        self.ready = asyncio.Event()
        self.ca_bundle = b""
        self.thread: ServingThread | None = None
        try:
            self.server = self._server(registry)
        except ValueError:  # another webhook in this process already registered the core webhook metrics
            log.warning("webhook metrics already registered by another component; teams webhook metrics "
                        "are kept in a private registry")
            self.server = self._server(CollectorRegistry())

    def _server(self, registry: CollectorRegistry) -> WebhookServer:
        cert, key = self._certs()
        return WebhookServer(cert, key, host=self.opts.host, port=self.opts.port, registry=registry)

    def _certs(self) -> tuple[str, str]:
        o = self.opts
        if o.cert and o.key:
            if not o.ca_bundle and o.register_webhook:
                raise errors.ConfigError("teams webhook", [("webhook.caBundle", None,
                                                            "required with webhook.cert to register the webhook")])
            self.ca_bundle = Path(o.ca_bundle).read_bytes() if o.ca_bundle else b""
            return o.cert, o.key
        host = o.url_host or o.host
        hosts = [host] if not o.service else []
        if o.service:
            ns, _, rest = o.service.partition("/")
            name = rest.partition(":")[0]
            hosts = [f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        directory = Path(o.cert_dir) if o.cert_dir else Path(tempfile.mkdtemp(prefix="fk-teams-webhook-"))
        sc = write_serving_cert(directory, hosts)
        self.ca_bundle = sc.ca_bundle
        return str(sc.cert), str(sc.key)

    def objects(self) -> tuple[dict, dict]:
        return registrations(self.opts, self.own_namespace, self.server.port, self.ca_bundle, self.domain,
                             self.admission.kinds)

    async def start(self) -> None:
        if self.opts.own_thread:
            home = asyncio.get_running_loop()
            self.server.add(MUTATE, thread_safe_handler(self.admission.mutate, self.admission, home))
            self.server.add(VALIDATE, thread_safe_handler(self.admission.validate, self.admission, home))
            self.thread = ServingThread()
            await self.thread.call(self.server.start())
        else:
            self.server.add(MUTATE, self.admission.serve_mutate)
            self.server.add(VALIDATE, self.admission.serve_validate)
            await self.server.start()
        log.info("teams webhook serving on https://%s:%d%s", self.opts.host, self.server.port,
                 " (its own thread)" if self.thread else "")
        if self.opts.register_webhook:
            mutating, validating = self.objects()
            await self.kube.apply(MUTATING_WEBHOOKS, mutating)
            await self.kube.apply(VALIDATING_WEBHOOKS, validating)
            log.info("registered webhook configurations %s", self.opts.config_name)
        self.ready.set()

    async def stop(self) -> None:
        try:
            if self.opts.register_webhook and self.opts.unregisters_on_exit:
                await unregister(self.kube, self.opts.config_name)
        except errors.FleetkeeperError as exc:
            log.warning("could not unregister webhook %s: %s", self.opts.config_name, exc)
        finally:
            if self.thread is not None:
                try:
                    await self.thread.call(self.server.stop())
                finally:
                    await self.thread.close()
                    self.thread = None
            else:
                await self.server.stop()

    async def run(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())
