"""Serving and registering the toleration webhook.

:func:`registrations` (pure) builds the Mutating- and
ValidatingWebhookConfiguration; :class:`WebhookRunner` serves the handlers
over TLS and registers them by URL (local control plane) or Service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.admission import Admission, AdmissionRequest
from fleetkeeper.core.kube import MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS, Kube
from fleetkeeper.core.pki import ServingCert
from fleetkeeper.core.webhook import SharedWebhooks, WebhookAsk, WebhookServer, registration, webhook_entry

from fleetkeeper.teams.admission import DEFAULT_KINDS, TeamAdmission
from fleetkeeper.teams.workloads import WorkloadKinds
from fleetkeeper.teams.options import WebhookOptions

log = logging.getLogger("fleetkeeper.teams.webhook")

MUTATE, VALIDATE = "teams-mutate", "teams-validate"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


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


def thread_safe_handler(decide: Callable[[AdmissionRequest], Admission], admission: TeamAdmission,
                        home: asyncio.AbstractEventLoop | None
                        ) -> Callable[[AdmissionRequest], Admission | Awaitable[Admission]]:
    """``decide`` answered at once, in whichever thread serves it, when it can be:
    only a request whose owner the index has not seen yet (a controller's pod
    created a moment after its owner) waits, and that wait runs on ``home``, the
    manager's loop, where the owner index lives."""

    def serve(req: AdmissionRequest) -> Admission | Awaitable[Admission]:
        ref = admission.needs_owner(req)
        if ref is None or admission.wait_owner is None:
            return decide(req)
        wait = admission.wait_owner(req.namespace, ref, admission.owner_wait_s)

        async def after_wait() -> Admission:
            loop = home or asyncio.get_running_loop()
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wait, loop))  # type: ignore[arg-type]
            return decide(req)
        return after_wait()
    return serve


class WebhookRunner:
    """The toleration webhook's handlers on the process's one webhook server (``register``: the manager's
    :meth:`Manager.webhook`; without it, a server of its own, started and stopped with :meth:`run`), and
    the registration of its configurations."""

    def __init__(self, kube: Kube, admission: TeamAdmission, opts: WebhookOptions, own_namespace: str,
                 domain: str, registry: CollectorRegistry,
                 register: Callable[[WebhookAsk, dict], SharedWebhooks] | None = None):
        self.kube, self.admission, self.opts = kube, admission, opts
        self.own_namespace, self.domain = own_namespace, domain
        self.ready = asyncio.Event()
        self._explicit_ca: bytes | None = None
        self._own = register is None
        if register is None:
            register = SharedWebhooks(registry, host=opts.host, port=opts.port).register_and_return
        try:
            home: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            home = None
        # the server may run on a thread of its own (SharedWebhooks.own_thread): answer there,
        # and wait for the owner index, if at all, on this (the manager's) loop
        self.webhooks = register(self._ask(), {MUTATE: thread_safe_handler(self.admission.mutate, admission, home),
                                               VALIDATE: thread_safe_handler(self.admission.validate, admission,
                                                                             home)})

    @property
    def server(self) -> WebhookServer:
        return self.webhooks.server

    @property
    def ca_bundle(self) -> bytes:
        return self._explicit_ca if self._explicit_ca is not None else self.webhooks.ca_bundle

    def _ask(self) -> WebhookAsk:
        o = self.opts
        if o.cert and o.key:
            if not o.ca_bundle and o.register_webhook:
                raise errors.ConfigError("teams webhook", [("webhook.caBundle", None,
                                                            "required with webhook.cert to register the webhook")])
            self._explicit_ca = Path(o.ca_bundle).read_bytes() if o.ca_bundle else b""
            mounted = ServingCert(Path(o.cert), Path(o.key), Path(o.ca_bundle or o.cert))
            return WebhookAsk("teams", (MUTATE, VALIDATE), o.host, o.port, mounted=mounted)
        host = o.url_host or o.host
        hosts = [host] if not o.service else []
        if o.service:
            ns, _, rest = o.service.partition("/")
            name = rest.partition(":")[0]
            hosts = [f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        return WebhookAsk("teams", (MUTATE, VALIDATE), o.host, o.port, tuple(hosts),
                          cert_dir=Path(o.cert_dir) if o.cert_dir else None)

    def objects(self) -> tuple[dict, dict]:
        return registrations(self.opts, self.own_namespace, self.server.port, self.ca_bundle, self.domain,
                             self.admission.kinds)

    async def start(self) -> None:
        await self.webhooks.started.wait()
        log.info("teams webhook serving on https://%s:%d", self.server.host, self.server.port)
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

    async def run(self) -> None:
        own = asyncio.ensure_future(self.webhooks.run()) if self._own else None
        try:
            await self.start()
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())
            if own is not None:
                own.cancel()
                await asyncio.gather(own, return_exceptions=True)
