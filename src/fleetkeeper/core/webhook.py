"""Admission webhooks: one TLS server, pure handlers.

A handler is a plain function ``(AdmissionRequest) -> Admission`` (no I/O),
so it is unit-tested directly and timed in process. :class:`WebhookServer`
serves handlers over HTTPS (aiohttp), records latency and results, and
:func:`registration` builds the Mutating/ValidatingWebhookConfiguration that
registers them by URL (local control plane) or by Service (in-cluster).
"""

from __future__ import annotations

import base64
import logging
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from fleetkeeper.core.metrics import PREFIX

log = logging.getLogger("fleetkeeper.webhook")


@dataclass(frozen=True)
class AdmissionRequest:
    uid: str
    kind: str  # Pod, Node
    operation: str  # CREATE, UPDATE, ...
    namespace: str
    name: str
    username: str
    groups: tuple[str, ...]
    obj: dict
    old: dict | None
    dry_run: bool

    @classmethod
    def from_review(cls, review: dict) -> "AdmissionRequest":
        r = review["request"]
        ui = r.get("userInfo") or {}
        obj = r.get("object") or {}
        return cls(
            uid=r["uid"], kind=(r.get("kind") or {}).get("kind", ""), operation=r.get("operation", ""),
            namespace=r.get("namespace", ""), name=r.get("name") or (obj.get("metadata") or {}).get("name", ""),
            username=ui.get("username", ""), groups=tuple(ui.get("groups") or ()), obj=obj,
            old=r.get("oldObject"), dry_run=bool(r.get("dryRun")),
        )


@dataclass
class Admission:
    allowed: bool = True
    message: str = ""
    patch: list[dict] = field(default_factory=list)  # RFC 6902 JSON Patch
    warnings: list[str] = field(default_factory=list)
    code: int = 403

    def response(self, uid: str) -> dict:
        resp: dict[str, Any] = {"uid": uid, "allowed": self.allowed}
        if not self.allowed:
            resp["status"] = {"code": self.code, "message": self.message, "reason": "Forbidden"}
        if self.patch:
            resp["patchType"] = "JSONPatch"
            resp["patch"] = base64.b64encode(orjson.dumps(self.patch)).decode()
        if self.warnings:
            resp["warnings"] = self.warnings
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}


Handler = Callable[[AdmissionRequest], Admission]
_METRICS_BY_REGISTRY = weakref.WeakKeyDictionary()


def webhook_metrics(registry: CollectorRegistry) -> "WebhookMetrics":
    """One set of webhook collectors per registry, shared by every WebhookServer on it."""
    m = _METRICS_BY_REGISTRY.get(registry)
    if m is None:
        m = _METRICS_BY_REGISTRY[registry] = WebhookMetrics(registry)
    return m


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(f"{PREFIX}_webhook_requests_total", "Admission requests by webhook and result",
                                ["webhook", "result"], registry=registry)
        self.latency = Histogram(f"{PREFIX}_webhook_duration_seconds", "Admission handler latency", ["webhook"],
                                 registry=registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1))

    def init(self, name: str) -> None:
        for r in ("allowed", "patched", "denied", "error"):
            self.requests.labels(name, r)
        self.latency.labels(name)


class WebhookServer:
    """HTTPS server for admission handlers at ``/<name>``."""

    def __init__(self, cert: str, key: str, *, host: str = "127.0.0.1", port: int = 0,
                 registry: CollectorRegistry | None = None):
        self.cert, self.key, self.host, self.port = cert, key, host, port
        self.metrics = webhook_metrics(registry or CollectorRegistry())
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.handlers: dict[str, Handler] = {}
        self._runner: web.AppRunner | None = None

    def add(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler
        self.metrics.init(name)

        async def serve(request: web.Request) -> web.Response:
            t0 = time.perf_counter()
            try:
                review = orjson.loads(await request.read())
                req = AdmissionRequest.from_review(review)
            except (ValueError, KeyError) as exc:
                self.metrics.requests.labels(name, "error").inc()
                return web.Response(status=400, text=f"bad AdmissionReview: {exc}")
            try:
                result = handler(req)
            except Exception as exc:  # a handler bug must answer, not hang the API server
                log.exception("webhook %s failed on %s/%s", name, req.namespace, req.name)
                result = Admission(False, f"fleetkeeper webhook {name} internal error: {exc}", code=500)
                self.metrics.requests.labels(name, "error").inc()
            else:
                self.metrics.requests.labels(
                    name, "denied" if not result.allowed else ("patched" if result.patch else "allowed")).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return web.Response(body=orjson.dumps(result.response(req.uid)), content_type="application/json")

        self.app.router.add_post(f"/{name}", serve)

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        self.ssl_context = ctx
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ctx)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def url(self, name: str) -> str:
        return f"https://{self.host}:{self.port}/{name}"


def registration(kind: str, config_name: str, webhooks: list[dict]) -> dict:
    """A MutatingWebhookConfiguration (kind="mutating") or ValidatingWebhookConfiguration."""
    k = "MutatingWebhookConfiguration" if kind == "mutating" else "ValidatingWebhookConfiguration"
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": k, "metadata": {"name": config_name},
            "webhooks": webhooks}


def webhook_entry(name: str, *, url: str | None = None, service: dict | None = None, ca_bundle: bytes,
                  rules: list[dict], failure_policy: str, timeout_seconds: int = 2,
                  namespace_selector: dict | None = None, object_selector: dict | None = None,
                  reinvocation: str | None = None, side_effects: str = "None") -> dict:
    client: dict[str, Any] = {"caBundle": base64.b64encode(ca_bundle).decode()}
    if url:
        client["url"] = url
    else:
        client["service"] = service
    entry: dict[str, Any] = {
        "name": name, "clientConfig": client, "rules": rules, "failurePolicy": failure_policy,
        "sideEffects": side_effects, "admissionReviewVersions": ["v1"], "timeoutSeconds": timeout_seconds,
    }
    if namespace_selector is not None:
        entry["namespaceSelector"] = namespace_selector
    if object_selector is not None:
        entry["objectSelector"] = object_selector
    if reinvocation:
        entry["reinvocationPolicy"] = reinvocation
    return entry


def json_patch_path(*parts: str) -> str:
    """Escape path parts for RFC 6901 (``/`` and ``~`` in label keys)."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)
